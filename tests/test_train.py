"""End-to-end training: results, exact resume after SIGTERM and kill -9, bad checkpoints,
incompatible configs, non-finite losses. Tiny model (configs/debug.py), a few steps."""
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import debug
from rvlm import checkpointing
from rvlm import train
from rvlm.utils import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 24
# Command-line overrides shared by every subprocess run (same schedule, same data).
FLAGS = [f"--config.train.total_steps={TOTAL}", "--config.train.log_every=2",
         "--config.train.checkpoint_every=4", "--config.train.eval_every=1000",
         "--config.eval.num_examples=32", "--config.eval.splits=('test',)"]


def config(**train_overrides):
  c = debug.get_config()
  c.train.update(total_steps=8, log_every=2, checkpoint_every=4, eval_every=1000)
  c.train.update(train_overrides)
  c.eval.update(num_examples=32, splits=("test",))
  return c


def rows_by_step(workdir):
  """metrics.jsonl rows with a loss, the last one per step (a resumed run re-logs)."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        rows[row["step"]] = row
  return rows


def final_params(workdir):
  """(step, params) of the newest checkpoint in `workdir` (debug-config shapes)."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from rvlm.models import vlm  # pylint: disable=g-import-not-at-top
  c = config()
  model = vlm.make_model(c.model)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                     train.dummy_batch(c, 1))["params"])
  step = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir)).latest_step()
  params = checkpointing.load_params(workdir, abstract)
  return step, jax.tree.map(np.asarray, params)


def start(workdir, *extra):
  cmd = [sys.executable, "-m", "rvlm.main", "--config=configs/debug.py",
         f"--workdir={workdir}", *FLAGS, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def wait_for_checkpoint(workdir, proc, timeout=240):
  """Blocks until the run has committed its first checkpoint; returns its steps."""
  ckdir = checkpointing.checkpoint_dir(workdir)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(ckdir):
      steps = [int(d) for d in os.listdir(ckdir) if d.isdigit()]
      if steps:
        return steps
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.02)
  raise TimeoutError("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  proc = start(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  with open(os.path.join(workdir, "train.log"), "w") as f:  # for the log-line test
    f.write(out)
  return workdir


def test_results_and_metrics_are_written(uninterrupted):
  with open(os.path.join(uninterrupted, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == TOTAL and results["split"] == "test"
  assert set(results["accuracy_by_depth"]) == {"1", "2"}
  assert all(0.0 <= a <= 1.0 for a in results["accuracy_by_depth"].values())
  assert 0.0 < results["majority_baseline"] <= 1.0
  assert results["by_family"] and results["by_hops"]
  for fam in results["by_family"].values():
    assert set(fam) == {"1", "2"}
  assert set(results["cka_with_e0_by_depth"]) == {"1", "2"}
  assert results["cka_with_e0_by_depth"]["1"] == pytest.approx(1.0, abs=1e-5)
  assert os.path.getsize(os.path.join(uninterrupted, "accuracy_by_depth.png")) > 1000
  rows = rows_by_step(uninterrupted)
  assert sorted(rows) == list(range(2, TOTAL + 1, 2))
  for key in ("loss/r1", "loss/r2", "accuracy/r1", "regressions/r2", "lr", "grad_norm",
              "connector/alpha_mean_abs"):
    assert all(math.isfinite(r[key]) for r in rows.values()), key
  # The per-step losses go down over the run.
  assert rows[TOTAL]["loss/r2"] < rows[2]["loss/r2"]
  assert os.listdir(os.path.join(uninterrupted, "tb"))


def test_generated_exact_match_agrees_with_teacher_forced(uninterrupted):
  """The final evaluation decodes every answer too. The debug data's answers are one
  token, and for those free-running greedy decoding and teacher forcing read the same
  prefixes, so the two exact matches must be equal at every depth. (After 24 steps both
  may be 0; that decoding equals the teacher-forced pass logit for logit is tested in
  tests/test_decode.py, and per example in tests/test_evaluate_cli.py.)"""
  with open(os.path.join(uninterrupted, "results.json")) as f:
    results = json.load(f)
  c = config()
  batches = train.data_lib.build_eval_batches(c, "test", c.eval.batch_size, 32)
  lengths = {int(b["mask_loss"][i].sum()) for b in batches
             for i in np.flatnonzero(b["example_mask"])}
  assert lengths == {2}  # one answer token + eos
  generated, forced = results["generated_exact_match_by_depth"], results["accuracy_by_depth"]
  assert set(generated) == set(forced) == {"1", "2"}
  for d in forced:
    assert generated[d] == pytest.approx(forced[d], abs=1e-9)
  assert set(results["generated_f1_by_depth"]) == {"1", "2"}
  for d, a in results["normalised_exact_match_by_depth"].items():
    assert generated[d] <= a <= 1.0
  assert 0.0 < results["normalised_majority_baseline"] <= 1.0


def test_progress_compile_time_and_eval_sizes_are_logged(uninterrupted):
  """The run's absl log (log_every=2) has a progress line after step 1, before the first
  log_every boundary, the compile time, and each evaluation announced with its size
  before it runs. (The 30 s progress interval is tested with a fake clock in
  tests/test_metrics.py.)"""
  with open(os.path.join(uninterrupted, "train.log")) as f:
    lines = f.read().splitlines()
  index = lambda text: next(i for i, l in enumerate(lines) if text in l)  # noqa: E731
  assert re.search(r"\] first train step \(compile \+ run\): \d+\.\d s$",
                   lines[index("first train step")])
  assert index("first train step") < index(f"step 1/{TOTAL} (first step") < index(
      f"step 2/{TOTAL} (")
  malloc = machine.malloc_library()  # the trainer ran in a child with this environment
  assert lines[index("] malloc: ")].endswith(
      f"malloc: {malloc}" + (" (tcmalloc through LD_PRELOAD can make CPU steps faster: "
                             "README, 'Install and run')" if malloc == "glibc" else ""))
  size = "32 examples in 1 batch, depths 1..2"
  assert index(f"step {TOTAL}: evaluating test ({size})") < index(
      f"step {TOTAL} test accuracy by depth")
  assert index(f"generated exact match: decoding test ({size}, up to ") < index(
      "generated (greedy) exact match by depth")
  # Padding rows (example_mask 0) of the last batch are not counted.
  padded = [{"example_mask": np.array([1, 1])}, {"example_mask": np.array([1, 0])}]
  assert train._eval_size(padded) == "3 examples in 2 batches"


def test_sigterm_then_kill9_resume_matches_uninterrupted(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  # SIGTERM: a checkpoint is saved and the process exits 0.
  proc = start(workdir)
  wait_for_checkpoint(workdir, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  saved = checkpointing.Checkpointer(checkpointing.checkpoint_dir(workdir)).latest_step()
  assert 0 < saved < TOTAL, out
  assert not os.path.exists(os.path.join(workdir, "results.json"))

  # Resume; kill -9 once it has saved another checkpoint (mid-run).
  proc = start(workdir)
  ckdir = checkpointing.checkpoint_dir(workdir)
  deadline = time.time() + 240
  while not any(d.isdigit() and int(d) > saved for d in os.listdir(ckdir)):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.02)
  proc.kill()
  out, _ = proc.communicate()
  assert f"resumed from {ckdir} at step {saved}" in out

  # Resume to the end: same parameters and logged losses as the uninterrupted run.
  proc = start(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  step_a, params_a = final_params(uninterrupted)
  step_b, params_b = final_params(workdir)
  assert step_a == step_b == TOTAL
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(a, b)
  rows_a, rows_b = rows_by_step(uninterrupted), rows_by_step(workdir)
  assert sorted(rows_a) == sorted(rows_b)
  # SIGTERM stops at whatever step it arrives. Off a log_every (2) boundary, the resumed
  # run's first logged window starts there and is shorter than the uninterrupted one's,
  # so that one row averages fewer steps (the trainer warns of this for checkpoints).
  split_window = saved + 1 if saved % 2 else None
  for step in rows_a:
    if step == split_window:
      continue
    for key in ("loss", "loss/r1", "loss/r2", "accuracy/r2", "grad_norm"):
      assert rows_a[step][key] == rows_b[step][key], (step, key)


def test_corrupt_latest_checkpoint_falls_back_and_bad_configs_fail(tmp_path, caplog):
  workdir = str(tmp_path)
  train.train_and_evaluate(config(), workdir)
  ckdir = checkpointing.checkpoint_dir(workdir)
  assert sorted(int(d) for d in os.listdir(ckdir) if d.isdigit()) == [4, 8]

  # An incompatible model: the error names the mismatching params; nothing is touched.
  c = config()
  c.model.decoder.mlp_dim = 48
  before = sorted(os.listdir(ckdir))
  with pytest.raises(ValueError, match=r"mlp.*\(2, 32, 64\).*\(2, 32, 48\)"):
    train.train_and_evaluate(c, workdir)
  assert sorted(os.listdir(ckdir)) == before

  # A non-finite loss stops the run before anything is saved.
  c = config(total_steps=12)
  c.loss.step_weights = (float("nan"), 1.0)
  with pytest.raises(train.NonFiniteLossError, match="steps 9-10"):
    train.train_and_evaluate(c, workdir)
  assert sorted(os.listdir(ckdir)) == before
  # ... or, by config, skips the bad updates and carries on.
  c.train.nan_policy = "skip"
  shutil.copytree(workdir, workdir + "_skip")
  train.train_and_evaluate(c, workdir + "_skip")
  _, params_8 = final_params(workdir)
  step, params_12 = final_params(workdir + "_skip")
  assert step == 12
  for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_12)):
    np.testing.assert_array_equal(a, b)

  # A truncated latest checkpoint: the previous one is used, with a warning.
  state_dir = os.path.join(ckdir, "8", "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      if "manifest" in name:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(3)
  with caplog.at_level(logging.WARNING):
    results = train.train_and_evaluate(config(), workdir)
  assert any("unreadable" in r.getMessage() for r in caplog.records)
  assert results["step"] == 8
  assert os.path.isdir(os.path.join(ckdir, "4"))
