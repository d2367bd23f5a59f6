"""What a measurement ran on: the CPU, its vector / matrix extensions and the malloc.

Machines of one kind differ (an AMD EPYC and an Intel Xeon with AMX have both been
seen), and which matmul library wins, and how much the allocator costs, depend on
exactly these facts; every benchmark and study result records them.
"""
import os
import platform

# The vector / matrix extensions that decide which library wins a matmul: "Intel Xeon
# Processor" alone hides whether oneDNN can use AMX, which XLA:CPU does not.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")

# malloc replacements (LD_PRELOAD or linked in). XLA:CPU takes each step's temp buffers
# from malloc afresh; glibc serves buffers that large as fresh mmaps, page-faulted again
# on every step, where these keep them (docs/performance.md, "The allocator").
MALLOC_LIBRARIES = ("tcmalloc", "jemalloc", "mimalloc")


def describe():
  """{platform, processor, cpu_count, python, malloc}."""
  return {"platform": platform.platform(), "processor": cpu_info()[0],
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "malloc": malloc_library()}


def cpu_info():
  """(CPU model name, the ISA_FLAGS it has) from /proc/cpuinfo; (platform.processor(),
  []) where that cannot be read."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
  except OSError:
    return platform.processor(), []
  fields = dict(l.split(":", 1) for l in reversed(lines) if ":" in l)  # the first CPU's
  fields = {k.strip(): v.strip() for k, v in fields.items()}
  name, flags = fields.get("model name"), set(fields.get("flags", "").split())
  return name or platform.processor(), [f for f in ISA_FLAGS if f in flags]


def malloc_library(maps="/proc/self/maps"):
  """The malloc this process runs on: the first of MALLOC_LIBRARIES mapped into it
  (read from `maps`), else the C library's name ('glibc'), or 'unknown'."""
  try:
    with open(maps) as f:
      libs = {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line}
  except OSError:
    libs = set()
  for name in MALLOC_LIBRARIES:
    if any(lib.startswith(f"lib{name}") for lib in libs):
      return name
  return platform.libc_ver()[0] or "unknown"
