"""Multi-process settings, the multi-slice mesh and launch/local.py, without starting
a job (tests/test_multiprocess.py starts real ones)."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from rvlm import distributed
from rvlm import metrics
from rvlm import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.py")


def test_resolve_single_process_by_default():
  assert distributed.resolve("auto", environ={}) is None
  assert distributed.resolve("off", environ={"SLURM_NTASKS": "4"}) is None


def test_resolve_explicit_flags_win_over_environment():
  env = {"RVLM_COORDINATOR_ADDRESS": "10.0.0.1:1234", "RVLM_NUM_PROCESSES": "4",
         "RVLM_PROCESS_ID": "3", "RVLM_HEARTBEAT_TIMEOUT_S": "7"}
  s = distributed.resolve("auto", environ=env)
  assert s == distributed.Settings("10.0.0.1:1234", 4, 3, heartbeat_timeout_s=7)
  s = distributed.resolve("auto", process_id=1, heartbeat_timeout_s=9, environ=env)
  assert (s.process_id, s.heartbeat_timeout_s) == (1, 9)


def test_resolve_leaves_detection_to_jax_on_clusters():
  auto = distributed.Settings(heartbeat_timeout_s=distributed.DEFAULT_HEARTBEAT_S)
  assert distributed.resolve("on", environ={}) == auto
  assert distributed.resolve("auto", environ={"SLURM_NTASKS": "8"}) == auto
  assert distributed.resolve("auto", environ={"TPU_WORKER_HOSTNAMES": "a,b"}) == auto
  assert distributed.resolve("auto", environ={"TPU_WORKER_HOSTNAMES": "a"}) is None


@pytest.mark.parametrize("kwargs,env,match", [
    (dict(coordinator_address="h:1"), {}, "incomplete.*num_processes, process_id"),
    ({}, {"RVLM_NUM_PROCESSES": "2", "RVLM_PROCESS_ID": "0"}, "RVLM_COORDINATOR_ADDRESS"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, r"process_id=2.*\[0, 2\)"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), {}, "HOST:PORT"),
    ({}, {"RVLM_COORDINATOR_ADDRESS": "h:1", "RVLM_NUM_PROCESSES": "two",
          "RVLM_PROCESS_ID": "0"}, "RVLM_NUM_PROCESSES='two' is not an integer"),
    (dict(heartbeat_timeout_s=0), {}, None),  # 0 = default, allowed
])
def test_resolve_names_the_bad_setting(kwargs, env, match):
  if match is None:
    distributed.resolve("auto", environ=env, **kwargs)
    return
  with pytest.raises(ValueError, match=match):
    distributed.resolve("auto", environ=env, **kwargs)


def test_resolve_refuses_settings_with_distributed_off():
  with pytest.raises(ValueError, match="--distributed=off"):
    distributed.resolve("off", coordinator_address="h:1", num_processes=2, process_id=0,
                        environ={})
  with pytest.raises(ValueError, match="--distributed"):
    distributed.resolve("maybe", environ={})


def _mesh_config(**kw):
  return ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "dcn_data": 1, **kw})


def test_dcn_data_must_match_the_slices_or_hosts():
  # One process of 8 simulated devices is one granule: two slices cannot be formed.
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn_data=2.*1 processes"):
    sharding.make_mesh(_mesh_config(dcn_data=2, fsdp=2))
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn_data=3.*divide the device count 8"):
    sharding.make_mesh(_mesh_config(dcn_data=3))
  mesh = sharding.make_mesh(_mesh_config(dcn_data=1, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_local_launcher_dry_run_prints_each_process_command():
  out = subprocess.run(
      [sys.executable, LOCAL, "--num_processes=3", "--devices_per_process=2", "--port=4321",
       "--heartbeat_timeout_s=9", "--dry_run", "--", "--config=configs/debug.py",
       "--workdir=/tmp/a b"], capture_output=True, text=True, check=True).stdout
  lines = out.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert f"cd {ROOT} && env " in line
    for part in ("JAX_NUM_CPU_DEVICES=2", "JAX_PLATFORMS=cpu", "RVLM_HEARTBEAT_TIMEOUT_S=9",
                 "RVLM_COORDINATOR_ADDRESS=127.0.0.1:4321", "RVLM_NUM_PROCESSES=3",
                 f"RVLM_PROCESS_ID={i}"):
      assert part in line
    assert line.endswith(f"-m rvlm.main --config=configs/debug.py '--workdir=/tmp/a b'")
  gpu = subprocess.run(
      [sys.executable, LOCAL, "--num_processes=2", "--devices_per_process=2",
       "--platform=gpu", "--dry_run", "--", "--workdir=w"],
      capture_output=True, text=True, check=True).stdout.splitlines()
  assert "CUDA_VISIBLE_DEVICES=0,1" in gpu[0] and "CUDA_VISIBLE_DEVICES=2,3" in gpu[1]


def test_local_launcher_refuses_an_empty_command():
  res = subprocess.run([sys.executable, LOCAL, "--num_processes=2"],
                       capture_output=True, text=True)
  assert res.returncode == 2 and "give the module's arguments after --" in res.stderr


def test_main_refuses_bad_distributed_settings(tmp_path):
  env = dict(os.environ, RVLM_NUM_PROCESSES="2", RVLM_PROCESS_ID="0")
  env.pop("RVLM_COORDINATOR_ADDRESS", None)
  res = subprocess.run([sys.executable, "-m", "rvlm.main", "--config=configs/debug.py",
                        f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
  assert res.returncode == 2
  assert "RVLM_COORDINATOR_ADDRESS" in res.stderr and "Traceback" not in res.stderr
  assert not os.listdir(tmp_path)  # nothing written


def test_metrics_jsonl_survives_a_line_cut_by_a_kill(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
  writer = metrics.MetricWriter(str(tmp_path), process_index=0)
  writer.write_scalars(2, {"loss": 1.5})
  writer.close()
  rows = metrics.read_jsonl(str(path))
  assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_data_state_of_several_processes_restores_each_its_own(monkeypatch):
  from rvlm import checkpointing  # pylint: disable=g-import-not-at-top
  saved = {"kind": "processes", "value": [
      checkpointing._encode_data_state({"next": 4}),
      checkpointing._encode_data_state(b"\x00raw")]}
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert checkpointing._decode_data_state(saved) == b"\x00raw"
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  assert checkpointing._decode_data_state(saved) == {"next": 4}
  # Another process count cannot take these positions: the stream restarts.
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  assert checkpointing._decode_data_state(saved) is None
