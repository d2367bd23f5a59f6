"""rvlm.utils.machine: the facts every benchmark and study result records."""
import platform

from rvlm.utils import machine


def test_malloc_library_names_a_preloaded_allocator_else_the_c_library(tmp_path):
  maps = tmp_path / "maps"
  line = "7f00-7f01 r-xp 00000000 08:01 42 {}\n"
  def read(*paths):
    maps.write_text("".join(line.format(p) for p in paths) + "7f02-7f03 rw-p 0 0:0 0 [heap]\n")
    return machine.malloc_library(str(maps))
  libc = platform.libc_ver()[0] or "unknown"
  assert read("/usr/lib/x86_64-linux-gnu/libc.so.6") == libc
  assert read("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
              "/usr/lib/x86_64-linux-gnu/libc.so.6") == "tcmalloc"
  assert read("/opt/lib/libjemalloc.so.2") == "jemalloc"
  assert read("/site-packages/mimalloc_preload/libmimalloc.so") == "mimalloc"
  assert read("/data/notlibtcmalloc.txt") == libc        # a file of that name, not the library
  assert machine.malloc_library(str(tmp_path / "missing")) == libc
  assert machine.describe()["malloc"] == machine.malloc_library()
