"""python -m rvlm.compile_check: the 1b / 3b train steps compiled for a simulated
8-device FSDP mesh (nothing initialised or trained), and its refusals."""
import json
import os
import resource
import subprocess
import sys

import jax
import pytest

from configs import base
from rvlm import compile_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small text length and batch keep the two compiles short; the state bytes, what the
# sharding assertions are about, do not depend on them.
BATCH, SEQ_LEN = 8, 32


def _config(preset, *, mesh=(1, 8, 1), batch=BATCH, seq_len=SEQ_LEN):
  c = base.get_config(f"preset={preset}")
  c.data.update(batch_size=batch, seq_len=seq_len)
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return c


def _live_bytes():
  return sum(x.nbytes for x in jax.live_arrays())


@pytest.mark.parametrize("preset", ["1b", "3b"])
def test_presets_on_an_8_device_fsdp_mesh(preset):
  before = _live_bytes()
  r = compile_check.compile_check(_config(preset), jax.devices()[:8])

  # Nothing was created: no live device arrays beyond a PRNG key, and (3b) the process
  # never held as much memory as the params alone (the adam moments are twice that).
  assert _live_bytes() - before < 2**20
  if preset == "3b":
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    assert peak_rss < r["state_bytes_total"]["params"]

  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["num_devices"] == 8
  assert r["batch_size"] == BATCH and r["batch_per_data_shard"] == 1
  assert r["seq_len"] == SEQ_LEN and r["image_tokens"] == (224 // 14) ** 2
  count = r["param_count"]
  assert (0.9e9 < count < 1.1e9) if preset == "1b" else (2.9e9 < count < 3.2e9)

  # f32 params; every kernel splits over fsdp=8 and only norms / biases / small
  # vectors are whole on each device.
  total = r["state_bytes_total"]["params"]
  assert total == 4 * count
  per_device = r["state_bytes_per_device"]["params"]
  assert total / 8 <= per_device < 1.02 * total / 8
  # adamw: two moments shaped like the params, plus a step count.
  opt = r["state_bytes_per_device"]["opt_state"]
  assert 2 * per_device <= opt < 2 * per_device + 2**20

  m = r["memory_per_device"]
  state = sum(r["state_bytes_per_device"].values())
  # XLA's own accounting of the compiled program agrees with the shardings: its
  # arguments are the state shards plus the batch shard (jit drops the unused labels).
  assert state <= m["argument"] <= state + r["batch_bytes_per_device"]
  # The new state is written into the donated old one.
  assert m["alias"] >= 0.99 * state and m["output"] >= m["alias"]
  assert m["temp"] > 0
  assert m["total"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  assert r["matmul_flops_total"] > 0 and r["xla_flops_per_device"] > 0
  assert r["matmul_flops_per_device"] == r["matmul_flops_total"] / 8
  assert r["compile_s"] > 0 and r["lower_s"] > 0

  text = compile_check.format_report(r)
  assert "data=1 fsdp=8 tensor=1 on 8 cpu devices" in text
  assert f"{per_device / 2**30:.3f} GiB" in text
  ok, line = compile_check.fits(r, 1000.0)
  assert ok and line.startswith("fits in 1000 GiB: OK")
  ok, line = compile_check.fits(r, m["total"] / 2**30 / 2)
  assert ok is False and "DOES NOT FIT" in line


def test_a_mesh_that_does_not_match_the_devices_is_refused():
  with pytest.raises(ValueError, match=r"config\.mesh \(data=3, fsdp=1, tensor=1\)"):
    compile_check.compile_check(_config("1b", mesh=(3, 1, 1)), jax.devices()[:8])


def test_a_batch_the_data_shards_do_not_divide_is_refused():
  with pytest.raises(ValueError, match=r"config\.data\.batch_size=12 .*data\*fsdp=8"):
    compile_check.compile_check(_config("1b", batch=12), jax.devices()[:8])


def test_a_text_length_resolved_from_data_is_refused():
  with pytest.raises(ValueError, match=r"config\.data\.seq_len=0"):
    compile_check.compile_check(_config("1b", seq_len=0), jax.devices()[:8])


def test_mesh_flag():
  c = compile_check.apply_mesh_flag(_config("tiny"), "2,-1,1")
  assert (c.mesh.data, c.mesh.fsdp, c.mesh.tensor) == (2, -1, 1)
  with pytest.raises(ValueError, match="--mesh='2,4'"):
    compile_check.apply_mesh_flag(c, "2,4")


def test_simulated_devices_in_a_process_that_already_has_devices():
  # conftest started 8 simulated devices: a smaller count takes the first ones.
  assert compile_check.simulated_devices(4) == jax.devices()[:4]
  with pytest.raises(ValueError, match="--num_devices=64"):
    compile_check.simulated_devices(64)


def _run(*args):
  return subprocess.run([sys.executable, "-m", "rvlm.compile_check", *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)


@pytest.mark.parametrize("args, needle", [
    (["--config=configs/base.py:preset=1b", "--mesh=3,1,1"],
     "config.mesh (data=3, fsdp=1, tensor=1): product 3 != device count 8 (--mesh=3,1,1)"),
    (["--config=configs/base.py:preset=5b"], "config.model preset '5b' is unknown"),
])
def test_cli_refusals_exit_2_with_one_line(args, needle):
  p = _run("--num_devices=8", *args)
  assert p.returncode == 2, p.stderr[-3000:]
  err = p.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("rvlm.compile_check: error: "), err
  assert needle in err[0]


def test_cli_simulates_the_devices_it_is_asked_for(tmp_path):
  # The subprocess inherits conftest's XLA_FLAGS (8 devices); --num_devices wins.
  # The smallest program the config allows (no ViT blocks, one decoder layer, R = 1):
  # this is about flags and devices, and the compile is most of its time.
  out = tmp_path / "report.json"
  p = _run("--config=configs/base.py:preset=tiny", "--num_devices=2", "--mesh=1,-1,1",
           "--config.data.batch_size=2", "--config.data.seq_len=8",
           "--config.model.vit.depth=0", "--config.model.decoder.depth=1",
           "--config.model.recursion.mode=none", "--config.model.recursion.num_steps=1",
           "--device_memory_gib=1", f"--json={out}")
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r["num_devices"] == 2 and r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
  assert r["fits"] is True and r["device_memory_gib"] == 1.0
  assert "data=1 fsdp=2 tensor=1 on 2 cpu devices" in p.stdout
  assert "fits in 1 GiB: OK" in p.stdout
