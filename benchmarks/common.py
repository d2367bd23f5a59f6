"""What the benchmarks share: the machine's description, timing, and running a child
process for its own peak memory."""
import datetime
import importlib.metadata
import os
import platform
import subprocess
import threading
import time

import numpy as np

from rvlm.utils import machine as machine_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = float(1 << 30)


def version(pkg):
  try:
    return importlib.metadata.version(pkg)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def machine():
  """CPU model and ISA, core count, malloc, package versions and the date: figures mean
  little without."""
  cpu, isa = machine_lib.cpu_info()
  return dict(cpu=cpu, isa=isa, cores=os.cpu_count(), malloc=machine_lib.malloc_library(),
              python=platform.python_version(),
              jax=version("jax"), flax=version("flax"), transformers=version("transformers"),
              torch=version("torch"), safetensors=version("safetensors"),
              orbax=version("orbax-checkpoint"),
              date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"))


def timed(fn, repeats, warmup=1, max_s=None):
  """(median seconds of `repeats` calls of fn() after `warmup` untimed ones, all seconds).

  With `max_s`, stops early once the timed calls have taken that long (at least one is
  timed): a slow path (torch's bf16 matmul on a CPU without bf16 GEMMs runs at ~1
  GFLOP/s) then costs seconds, not minutes. fn must block until its work is done (e.g.
  end in jax.block_until_ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    if max_s is not None and sum(times) >= max_s:
      break
  return float(np.median(times)), times


def _sample_rss(pid, peaks, done):
  """Polls /proc/PID/status: the process's RSS high-water mark (VmHWM) and the largest
  anonymous and file-backed RSS seen (sampled)."""
  while not done.is_set():
    try:
      with open(f"/proc/{pid}/status") as f:
        for line in f:
          field, _, value = line.partition(":")
          if field in ("VmHWM", "RssAnon", "RssFile"):
            peaks[field] = max(peaks.get(field, 0), int(value.split()[0]) * 1024)
    except (OSError, ValueError):
      pass
    done.wait(0.05)


def run_child(args, log_dir, name, env=None):
  """Runs `args`; returns {seconds, peak_rss_bytes, peak_anon_bytes, peak_file_bytes, rc,
  stdout, stderr} of that child, sampled from /proc every 50 ms (file: pages of
  memory-mapped files, e.g. shards). peak_rss_bytes is the child's VmHWM, not getrusage's
  ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss, so a
  child of a large benchmark process read as large as its parent."""
  out_path = os.path.join(log_dir, name + ".out")
  err_path = os.path.join(log_dir, name + ".err")
  peaks, done = {}, threading.Event()
  with open(out_path, "w") as out, open(err_path, "w") as err:
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=err, env=env)
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, peaks, done), daemon=True)
    sampler.start()
    status = proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
  with open(out_path) as f:
    stdout = f.read()
  with open(err_path) as f:
    stderr = f.read()
  return dict(seconds=seconds, peak_rss_bytes=peaks.get("VmHWM", 0),
              peak_anon_bytes=peaks.get("RssAnon", 0), peak_file_bytes=peaks.get("RssFile", 0),
              rc=status, stdout=stdout, stderr=stderr)
