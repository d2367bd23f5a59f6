"""Test setup: CPU only, 8 simulated devices. Must run before jax is imported."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  flags += " --xla_force_host_platform_device_count=8"
# Tests compile many small programs and run each briefly: LLVM's optimisation of the CPU
# code costs more time than it saves (measured on 2 cores: two compile-bound step tests
# 107 s -> 51 s; the study runner's test, mostly training, 217 s -> 184 s). Numerics
# stay within every test's tolerance. Training subprocesses inherit it.
if "xla_backend_optimization_level" not in flags:
  flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

import sys  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache for the whole test session, inherited by the
# training subprocesses the end-to-end tests start: identical programs compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rvlm_jax_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# Configs live outside the package; make `configs.*` importable in tests.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A workdir holding a checkpoint of configs/debug.py after 10 steps (a few seconds):
  for the inference entry points (rvlm.predict, rvlm.evaluate), which load a workdir."""
  from configs import debug  # pylint: disable=g-import-not-at-top
  from rvlm import train  # pylint: disable=g-import-not-at-top
  c = debug.get_config()
  c.train.update(total_steps=10, log_every=5, eval_every=10, checkpoint_every=10)
  c.eval.update(num_examples=32)
  workdir = str(tmp_path_factory.mktemp("trained_debug"))
  train.train_and_evaluate(c, workdir)
  return workdir
