"""Real multi-process jobs on this machine: two `python -m rvlm.main` processes joined by
jax.distributed (CPU collectives), started by launch/local.py.

The constant learning rate makes a run's trajectory independent of total_steps, so a
job killed at an unknown step can be resumed to any later step and compared with one
single-process reference run.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from rvlm import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.py")
REFERENCE_STEPS = 12
ARGS = ("--config=configs/debug.py", "--config.optim.schedule=constant",
        "--config.train.log_every=1", "--config.train.checkpoint_every=2",
        "--config.train.eval_every=1000", "--config.eval.num_examples=64",
        "--config.eval.splits=('val','test')", "--config.eval.generated=False")
# Same per-step loss on one process and on two (batch rows summed in another order).
LOSS_RTOL = 1e-5
# How long a survivor may take to notice a dead peer: the heartbeat timeout given to the
# job (5 s) plus start-up slack for a loaded 2-core machine.
HEARTBEAT_S, SURVIVOR_BOUND_S = 5, 60


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                            env.get("XLA_FLAGS", "")) + \
      f" --xla_force_host_platform_device_count={devices}"
  return env


class Job:
  """launch/local.py in its own session (so a test can kill the whole job)."""

  def __init__(self, tmp, name, workdir, steps, *, devices=1, extra=(), heartbeat=0):
    self.log_dir = str(tmp / f"{name}_logs")
    cmd = [sys.executable, LOCAL, "--num_processes=2", f"--devices_per_process={devices}",
           f"--log_dir={self.log_dir}", f"--heartbeat_timeout_s={heartbeat}", "--grace_s=120",
           "--", *ARGS, f"--workdir={workdir}", f"--config.train.total_steps={steps}", *extra]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                    daemon=True)
    self._reader.start()

  def wait(self, timeout=600):
    rc = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return rc

  def kill(self):
    os.killpg(self.proc.pid, signal.SIGKILL)
    self.wait()

  def launcher_says(self, pattern):
    return [m for line in self.lines if (m := re.search(pattern, line))]

  def log(self, index):
    with open(os.path.join(self.log_dir, f"process_{index}.log")) as f:
      return f.read()


def _committed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in (os.listdir(d) if os.path.isdir(d) else []) if n.isdigit())


def _wait_for(predicate, timeout, what, job=None):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    if job is not None and job.proc.poll() is not None:
      pytest.fail(f"the job ended before {what}:\n" + "".join(job.lines[-40:]))
    time.sleep(0.1)
  pytest.fail(f"timed out waiting for {what}")


def _losses(workdir):
  """{step: loss}; a step logged twice (before a kill, then resumed) keeps the later."""
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process, two devices (the two processes' device count), REFERENCE_STEPS steps."""
  workdir = str(tmp_path_factory.mktemp("single_process"))
  subprocess.run([sys.executable, "-m", "rvlm.main", *ARGS, f"--workdir={workdir}",
                  f"--config.train.total_steps={REFERENCE_STEPS}"],
                 cwd=ROOT, env=_env(2), check=True, capture_output=True, timeout=600)
  return workdir


def test_two_processes_killed_and_resumed_match_one_process(tmp_path, reference):
  workdir = str(tmp_path / "job")
  # Killed (SIGKILL, no chance to save) once its first checkpoint is committed.
  job = Job(tmp_path, "first", workdir, steps=1000)
  _wait_for(lambda: _committed_steps(workdir), 600, "the first checkpoint", job)
  job.kill()
  latest = _committed_steps(workdir)[-1]
  total = latest + 3
  assert total <= REFERENCE_STEPS, f"killed too late (step {latest})"

  resumed = Job(tmp_path, "resumed", workdir, steps=total)
  assert resumed.wait() == 0, "".join(resumed.lines[-40:])
  for i in range(2):
    assert f"resumed from {workdir}/checkpoints at step {latest}" in resumed.log(i)
  assert len(resumed.launcher_says(r"process \d exited with code 0")) == 2

  got, want = _losses(workdir), _losses(reference)
  assert sorted(got) == list(range(1, total + 1))
  print(f"killed after step {latest}, resumed to {total}: largest relative loss difference "
        f"{max(abs(got[s] / want[s] - 1) for s in got):.1e}")
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [want[s] for s in sorted(got)], rtol=LOSS_RTOL)
  # Only process 0 writes the run's files.
  assert "results.json" in os.listdir(workdir)
  assert _committed_steps(workdir)[-1] == total

  # The same checkpoint evaluated by one process: the same figures as by two.
  single = str(tmp_path / "single_eval")
  shutil.copytree(workdir, single)
  os.remove(os.path.join(single, "results.json"))
  subprocess.run([sys.executable, "-m", "rvlm.main", *ARGS, f"--workdir={single}",
                  f"--config.train.total_steps={total}"],
                 cwd=ROOT, env=_env(2), check=True, capture_output=True, timeout=600)
  two, one = _results(workdir)["splits"], _results(single)["splits"]
  for split in ("val", "test"):
    assert two[split]["num_examples"] == one[split]["num_examples"] == 64
    assert two[split]["accuracy_by_depth"] == one[split]["accuracy_by_depth"]
    assert two[split]["majority_baseline"] == one[split]["majority_baseline"]
    np.testing.assert_allclose(list(two[split]["loss_by_depth"].values()),
                               list(one[split]["loss_by_depth"].values()), rtol=1e-5)


def test_a_dead_peer_stops_the_survivor(tmp_path, reference):
  """Process 1 is killed mid-run: process 0 exits non-zero on its own, in bounded time.

  This job also runs the multi-slice path: two devices per process, data across the
  processes as over DCN (config.mesh.dcn_data=2) and fsdp within each.
  """
  workdir = str(tmp_path / "job")
  job = Job(tmp_path, "dead_peer", workdir, steps=1000, devices=2, heartbeat=HEARTBEAT_S,
            extra=("--config.mesh.dcn_data=2", "--config.mesh.data=1", "--config.mesh.fsdp=2"))
  _wait_for(lambda: _committed_steps(workdir), 600, "the first checkpoint", job)
  pid = int(job.launcher_says(r"process 1 pid (\d+)")[0].group(1))
  os.kill(pid, signal.SIGKILL)
  killed_at = time.time()
  rc = job.wait(timeout=SURVIVOR_BOUND_S + 120)
  took = time.time() - killed_at
  print(f"survivor stopped {took:.1f} s after its peer was killed (heartbeat {HEARTBEAT_S} s)")
  assert rc != 0
  survivor = job.launcher_says(r"process 0 exited with (.*) after")
  assert survivor and survivor[0].group(1) != "code 0"
  assert not job.launcher_says("still running"), "the launcher had to kill the survivor"
  assert took < SURVIVOR_BOUND_S, f"the survivor took {took:.1f} s"
  assert "another task died" in job.log(0) or "heartbeat" in job.log(0)
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in job.log(0)
  # Before the kill it trained the single-process trajectory.
  np.testing.assert_allclose(_losses(workdir)[1], _losses(reference)[1], rtol=LOSS_RTOL)


def test_sigterm_to_one_process_stops_all_at_one_step(tmp_path):
  """A preemption notice that reaches one host only: all save the same step and exit 0."""
  workdir = str(tmp_path / "job")
  job = Job(tmp_path, "preempted", workdir, steps=1000)
  _wait_for(lambda: _committed_steps(workdir), 600, "the first checkpoint", job)
  pid = int(job.launcher_says(r"process 1 pid (\d+)")[0].group(1))
  os.kill(pid, signal.SIGTERM)
  assert job.wait() == 0, "".join(job.lines[-40:])
  stopped = [re.search(r"stopped by SIGTERM at step (\d+)", job.log(i)) for i in range(2)]
  assert all(stopped), "".join(job.lines[-40:])
  assert stopped[0].group(1) == stopped[1].group(1)
  assert _committed_steps(workdir)[-1] == int(stopped[0].group(1))
