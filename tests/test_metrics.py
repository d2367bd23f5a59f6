"""Tests for rvlm.metrics: clu metric dicts, writers, progress, parameter overview, CKA."""
import glob
import logging
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tensorboardX.proto import event_pb2

from rvlm import metrics


def test_metrics_merge_inside_jit_is_token_weighted():
  @jax.jit
  def step(acc, loss, mask, lr):
    new = metrics.make_metrics(
        averages={"loss/r1": loss, "accuracy/r1": (loss < 1.0).astype(jnp.float32)},
        mask=mask, last_values={"lr": lr})
    return metrics.merge_metrics(acc, new)

  loss_a = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  mask_a = jnp.array([[1, 1], [1, 0]])
  loss_b = jnp.array([[0.5, 9.0], [6.0, 7.0]])
  mask_b = jnp.array([[1, 0], [0, 0]])
  acc = jax.jit(lambda l, m, lr: metrics.make_metrics(
      averages={"loss/r1": l, "accuracy/r1": (l < 1.0).astype(jnp.float32)},
      mask=m, last_values={"lr": lr}))(loss_a, mask_a, 0.1)
  acc = step(acc, loss_b, mask_b, 0.2)
  out = metrics.compute_metrics(acc)
  # 4 supervised tokens: (1 + 2 + 3 + 0.5) / 4; not the mean of per-batch means.
  assert out["loss/r1"] == pytest.approx(6.5 / 4)
  assert out["accuracy/r1"] == pytest.approx(1 / 4)
  assert out["lr"] == pytest.approx(0.2)
  assert all(isinstance(v, float) for v in out.values())


def test_merge_metrics_errors():
  a = metrics.make_metrics(averages={"loss": 1.0})
  b = metrics.make_metrics(averages={"other": 1.0})
  with pytest.raises(ValueError, match="names differ"):
    metrics.merge_metrics(a, b)
  with pytest.raises(ValueError, match="loss"):
    metrics.make_metrics(averages={"loss": jnp.ones((3,))}, mask=jnp.ones((2,)))


def _read_events(logdir):
  """Parses TFRecord-framed Event protos (no tensorboard package needed)."""
  events = []
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      events.append(event_pb2.Event.FromString(record))
  return events


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), process_index=0)
  writer.write_hparams({"optim": {"lr": 3e-3, "no_decay": (".*bias",)}, "seed": 0})
  writer.write_scalars(1, {"loss/r1": jnp.float32(2.5), "lr": np.float64(0.1)})
  writer.write_scalars(2, {"loss/r1": 1.5})
  writer.write_images(2, {"img_u8": np.zeros((4, 5, 3), np.uint8),
                          "img_f": np.full((4, 5, 1), 0.5, np.float32),
                          "batch": np.ones((2, 4, 5, 3), np.float32)})
  writer.write_texts(2, {"sample": "a cat"})
  writer.flush()
  writer.close()

  rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert rows == [{"step": 1, "loss/r1": 2.5, "lr": 0.1}, {"step": 2, "loss/r1": 1.5}]
  events = _read_events(os.path.join(tmp_path, "tb"))
  scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value
             if v.HasField("simple_value")}
  assert scalars[("loss/r1", 1)] == pytest.approx(2.5)
  assert scalars[("loss/r1", 2)] == pytest.approx(1.5)
  tags = {v.tag for e in events for v in e.summary.value}
  assert {"img_u8", "img_f", "batch"} <= tags
  assert any("sample" in t for t in tags)
  assert any("hparams" in t for t in tags)
  assert '"optim/lr": 0.003' in open(os.path.join(tmp_path, "hparams.json")).read()

  # A resumed run appends to the same JSONL file.
  writer = metrics.MetricWriter(str(tmp_path), process_index=0)
  writer.write_scalars(3, {"loss/r1": 1.0})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))] \
      == [1, 2, 3]


def test_metric_writer_other_processes_write_nothing(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path / "w"), process_index=1)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_images(1, {"img": np.zeros((2, 2, 3), np.uint8)})
  writer.write_texts(1, {"t": "x"})
  writer.write_hparams({"a": 1})
  writer.flush()
  writer.close()
  assert not os.path.exists(tmp_path / "w")


def test_progress_reporter_excludes_first_step():
  times = iter([100.0, 130.0, 132.0])  # step 1 took 30 s (compile), then 2 s per 4 steps
  progress = metrics.ProgressReporter(total_steps=25, batch_size=8, clock=lambda: next(times))
  line = progress(1)
  assert "no rates" in line and progress.metrics() == {}
  progress(3)
  line = progress(5)
  assert progress.steps_per_sec == pytest.approx(4 / 32)
  assert progress.metrics()["examples_per_sec"] == pytest.approx(8 * 4 / 32)
  assert progress.eta_sec == pytest.approx(20 / (4 / 32))
  assert "step 5/25" in line and "ETA 0:02:40" in line


class _Outputs:
  """Stands in for a step's outputs: counts how often the reporter waits for them."""

  def __init__(self):
    self.waits = 0

  def block_until_ready(self):
    self.waits += 1
    return self


def test_progress_reporter_logs_first_step_then_by_interval_or_log_every(caplog):
  now = [0.0]
  progress = metrics.ProgressReporter(total_steps=100, batch_size=4, log_every=10,
                                      every_secs=30.0, clock=lambda: now[0])

  def step_at(step, t):
    """Runs step `step` finishing at time `t`; (logged lines, waits for its outputs)."""
    now[0] = t
    out = _Outputs()
    caplog.clear()
    # The absl logger's own level too: a CLI run in this process may have lowered its
    # verbosity (absl.logging.set_verbosity).
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
      progress(step, ready=out)
    return [r.getMessage() for r in caplog.records if f"step {step}/100" in r.getMessage()], \
        out.waits

  # The first step (compilation) is logged although 1 is not a log_every boundary.
  lines, waits = step_at(1, 100.0)
  assert len(lines) == 1 and "no rates" in lines[0] and waits == 1
  # 12 s steps: nothing until 30 s have passed since the last line ...
  assert step_at(2, 112.0) == ([], 0)
  assert step_at(3, 124.0) == ([], 0)
  lines, waits = step_at(4, 136.0)  # ... then a line, between log_every boundaries.
  assert len(lines) == 1 and "0.08 steps/s" in lines[0] and waits == 1
  # The interval restarts at every line.
  assert step_at(5, 148.0) == ([], 0)
  assert step_at(6, 160.0) == ([], 0)
  assert len(step_at(7, 166.0)[0]) == 1
  # A log_every boundary logs however little time passed.
  assert step_at(9, 167.0) == ([], 0)
  assert len(step_at(10, 168.0)[0]) == 1
  # Fast steps: only log_every boundaries (and the last step).
  for step in range(11, 100):
    lines, _ = step_at(step, 168.0 + 0.1 * (step - 10))
    assert bool(lines) == (step % 10 == 0), step
  assert len(step_at(100, 180.0)[0]) == 1


def test_log_parameter_overview_boxed_and_abstract():
  params = {"dense": {"kernel": nn.LogicallyPartitioned(jnp.ones((3, 4)), ("embed", "mlp")),
                      "bias": jnp.zeros((4,))}}
  table, count = metrics.log_parameter_overview(params, include_stats=True)
  assert count == 16
  assert "dense/kernel" in table and "(3, 4)" in table and "Total: 16" in table
  abstract = jax.eval_shape(lambda: nn.unbox(params))
  assert metrics.log_parameter_overview(abstract)[1] == 16


def _cka_reference(x, y):
  """HSIC form with centring matrix H on n x n Gram matrices (an independent route)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = x.shape[0]
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  return np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l))


def test_linear_cka_reference_and_invariances():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 12)) + 3.0  # offset: centring matters
  y = x[:, :6] @ rng.normal(size=(6, 9)) + 0.5 * rng.normal(size=(64, 9))
  cka = jax.jit(metrics.linear_cka)
  np.testing.assert_allclose(cka(x, y), _cka_reference(x, y), rtol=1e-4)
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  np.testing.assert_allclose(cka(x, 2.5 * x @ q), 1.0, rtol=1e-4)
  np.testing.assert_allclose(cka(x, x + 7.0), 1.0, rtol=1e-4)
  independent = float(cka(x, rng.normal(size=(64, 12))))
  assert independent < 0.5
  np.testing.assert_allclose(cka(x, y), cka(y, x), rtol=1e-5)


def test_linear_cka_mask_ignores_masked_rows():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 5))
  mask = (np.arange(40) < 25).astype(np.float32)
  # Masked rows hold garbage that would change an unmasked CKA.
  x_bad, y_bad = x.copy(), y.copy()
  x_bad[25:] *= 100.0
  y_bad[25:] = -y_bad[25:] * 50.0
  masked = float(metrics.linear_cka(x_bad, y_bad, mask))
  subset = float(metrics.linear_cka(x[:25], y[:25]))
  assert masked == pytest.approx(subset, rel=1e-5)
  assert float(metrics.linear_cka(x_bad, y_bad)) != pytest.approx(subset, rel=1e-2)
