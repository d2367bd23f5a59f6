"""Metrics: in-step clu.metrics, writers (JSONL + TensorBoard), progress, CKA.

In the jitted step, build a dict of clu metrics; on the host, merge dicts over steps and
compute them when logging:

  # inside train_step (jitted); names may contain '/':
  m = make_metrics(averages={f"loss/r{r}": tok_loss[r] ...}, mask=mask_loss,
                   last_values={"lr": lr, "grad_norm": optax.global_norm(grads)})
  # host loop:
  acc = merge_metrics(acc, m)
  if step % log_every == 0:
    writer.write_scalars(step, compute_metrics(acc)); acc = None

`clu.metric_writers` imports TensorFlow, so `MetricWriter` reimplements its method names
on tensorboardX plus a JSONL file that plain Python can read back.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from flax import linen as nn
from tensorboardX import SummaryWriter
from tensorboardX import summary as tb_summary

# ---- in-step metrics ---------------------------------------------------------------


def make_metrics(averages=None, last_values=None, mask=None):
  """A dict of clu metrics: `Average` per `averages` entry, `LastValue` per `last_values`.

  Averages are over all unmasked elements, so pass per-token arrays (and the loss
  mask) to get a token-weighted mean across batches; a scalar counts once per batch.
  `mask` applies to every non-scalar entry of `averages`, whose leading dims must
  equal the mask's shape.
  """
  out = {}
  for name, v in (averages or {}).items():
    v = jnp.asarray(v, jnp.float32)
    m = None
    if mask is not None and v.ndim:
      if v.shape[:mask.ndim] != mask.shape:
        raise ValueError(f"make_metrics: {name} has shape {v.shape}; its leading dims "
                         f"must equal the mask's {mask.shape}")
      m = mask
    out[name] = clu_metrics.Average.from_model_output(v, mask=m)
  for name, v in (last_values or {}).items():
    out[name] = clu_metrics.LastValue.from_model_output(jnp.asarray(v, jnp.float32))
  return out


def merge_metrics(acc, new):
  """Merges two metric dicts (None = empty); works inside and outside jit."""
  if acc is None:
    return new
  if set(acc) != set(new):
    raise ValueError(f"merge_metrics: names differ: {sorted(set(acc) ^ set(new))}")
  return {k: acc[k].merge(new[k]) for k in acc}


def compute_metrics(acc):
  """{name: python float} of a metric dict (host side)."""
  return {k: float(jax.device_get(v.compute())) for k, v in acc.items()}


# ---- writers -----------------------------------------------------------------------


def _to_float(v):
  return float(np.asarray(jax.device_get(v)).item())


def _hparam_value(v):
  # TensorBoard hparams accept only bool/int/float/str.
  return v if isinstance(v, (bool, int, float, str)) else str(v)


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def _as_image(img):
  """uint8 or float ([0, 1]) HWC / NHWC / HW -> (array, tensorboardX dataformats)."""
  img = np.asarray(jax.device_get(img))
  if img.dtype != np.uint8:
    img = np.clip(img.astype(np.float32), 0.0, 1.0)
  formats = {2: "HW", 3: "HWC", 4: "NHWC"}
  if img.ndim not in formats:
    raise ValueError(f"write_images: expected HW, HWC or NHWC, got shape {img.shape}")
  return img, formats[img.ndim]


def _ends_with_newline(path):
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


class MetricWriter:
  """clu-style writer: `workdir/metrics.jsonl` plus TensorBoard events in `workdir/tb`.

  Only process 0 writes; on other processes every method is a no-op, so callers do
  not need to branch. The JSONL file is appended to, so a resumed run continues it.
  """

  def __init__(self, workdir, process_index=None):
    self.workdir = workdir
    index = jax.process_index() if process_index is None else process_index
    self.active = index == 0
    self._jsonl = self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      self._jsonl = open(path, "a")
      if self._jsonl.tell() and not _ends_with_newline(path):  # a killed run's last line
        self._jsonl.write("\n")
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tb"))

  def write_scalars(self, step, scalars):
    """One JSON line {'step': step, name: float, ...} and one TB scalar per name."""
    if not self.active:
      return
    step = int(step)
    values = {k: _to_float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    for k, v in values.items():
      self._tb.add_scalar(k, v, step)

  def write_images(self, step, images):
    if not self.active:
      return
    for k, img in images.items():
      img, fmt = _as_image(img)
      if fmt == "NHWC":
        self._tb.add_images(k, img, int(step), dataformats=fmt)
      else:
        self._tb.add_image(k, img, int(step), dataformats=fmt)

  def write_texts(self, step, texts):
    if not self.active:
      return
    for k, text in texts.items():
      self._tb.add_text(k, str(text), int(step))

  def write_hparams(self, hparams):
    """Flattened ('a/b') hparams to TensorBoard's hparams tab and `hparams.json`."""
    if not self.active:
      return
    flat = {k: _hparam_value(v) for k, v in _flatten(dict(hparams)).items()}
    with open(os.path.join(self.workdir, "hparams.json"), "w") as f:
      json.dump(flat, f, indent=2, sort_keys=True)
    # tensorboardX's add_hparams opens a new run directory; write into this one.
    for s in tb_summary.hparams(flat, {}):
      self._tb.file_writer.add_summary(s)

  def flush(self):
    if self.active:
      self._jsonl.flush()
      self._tb.flush()

  def close(self):
    if self.active and self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._jsonl = self._tb = None
      self.active = False


def read_jsonl(path):
  """The list of objects in a metrics.jsonl file, oldest first.

  A resumed run appends to the file, so a step may appear twice (the killed run's row,
  then the resumed one's: the later is the trajectory kept). A line cut short by a
  kill is skipped with a warning.
  """
  rows = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        logging.warning("%s:%d: skipping an unreadable line (a write cut short?)", path, n)
  return rows


# ---- progress ----------------------------------------------------------------------


def _duration(seconds):
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


class ProgressReporter:
  """Steps/s, examples/s and ETA; call once per finished step.

  The clock starts at the first call, so the first step (which includes compilation)
  is excluded from the rates. Resumed runs work: rates use steps since that call.
  A line is logged at the first call, every `log_every` steps, at the last step, and
  whenever `every_secs` of wall time have passed since the previous line: with slow
  steps, log_every steps can take many minutes, and a silent run looks hung.
  """

  def __init__(self, total_steps, batch_size, log_every=1, every_secs=30.0,
               clock=time.perf_counter):
    self.total_steps, self.batch_size, self.log_every = total_steps, batch_size, log_every
    self.every_secs = every_secs
    self._clock = clock
    self._t0 = self._step0 = self._logged_at = None
    self.steps_per_sec = self.examples_per_sec = self.eta_sec = None

  def __call__(self, step, ready=None):
    """Updates the rates after `step` finished; returns (and maybe logs) a line.

    `ready` (e.g. the step's outputs) is waited for before a line is logged: dispatch
    is asynchronous, so without it the clock would time the host running ahead of
    the device. Steps without a line do not wait.
    """
    now = self._clock()
    due = (self._t0 is None or step % self.log_every == 0 or step == self.total_steps
           or now - self._logged_at >= self.every_secs)
    if due and ready is not None:
      jax.block_until_ready(ready)
      now = self._clock()
    if self._t0 is None:
      self._t0, self._step0 = now, step
      line = f"step {step}/{self.total_steps} (first step, includes compilation; no rates yet)"
    else:
      elapsed = max(now - self._t0, 1e-9)
      self.steps_per_sec = (step - self._step0) / elapsed
      self.examples_per_sec = self.steps_per_sec * self.batch_size
      self.eta_sec = (self.total_steps - step) / max(self.steps_per_sec, 1e-9)
      line = (f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%) "
              f"{self.steps_per_sec:.2f} steps/s {self.examples_per_sec:.1f} examples/s "
              f"ETA {_duration(self.eta_sec)}")
    if due:
      self._logged_at = now
      logging.info("%s", line)
    return line

  def metrics(self):
    """{'steps_per_sec', 'examples_per_sec'} for write_scalars (empty before step 2)."""
    if self.steps_per_sec is None:
      return {}
    return {"steps_per_sec": self.steps_per_sec, "examples_per_sec": self.examples_per_sec}


# ---- logs -------------------------------------------------------------------------


class _QuietLibraries:
  """Drops INFO chatter of orbax / tensorstore (several lines per save) from the log."""

  def filter(self, record):
    return record.levelno > 20 or "/orbax/" not in record.pathname


def quiet_library_logs():
  logging.get_absl_handler().addFilter(_QuietLibraries())


# ---- parameters --------------------------------------------------------------------


def log_parameter_overview(params, include_stats=False):
  """Logs a table of param names, shapes and sizes; returns (table, total count).

  Accepts boxed (nn.LogicallyPartitioned) or plain params; `include_stats` adds
  mean/std columns (needs concrete arrays, not ShapeDtypeStructs).
  """
  params = nn.unbox(params)
  table = parameter_overview.get_parameter_overview(params, include_stats=include_stats)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  for line in table.split("\n"):
    logging.info("%s", line)
  return table, count


# ---- representation similarity -----------------------------------------------------


def linear_cka(x, y, mask=None):
  """Linear CKA between [N, Dx] and [N, Dy] features (Kornblith et al., 2019).

  CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc.
  Invariant to orthogonal transforms and isotropic scaling; 1 for identical features.
  `mask` [N] (optional) keeps only rows with mask 1 (e.g. real tokens, not padding),
  with static shapes so it works under jit.
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  m = jnp.ones(x.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  m = m[:, None]
  n = jnp.maximum(m.sum(), 1.0)
  x = (x - (x * m).sum(axis=0, keepdims=True) / n) * m
  y = (y - (y * m).sum(axis=0, keepdims=True) / n) * m
  cross = jnp.sum((y.T @ x) ** 2)
  norm_x = jnp.sqrt(jnp.sum((x.T @ x) ** 2))
  norm_y = jnp.sqrt(jnp.sum((y.T @ y) ** 2))
  return cross / (norm_x * norm_y)
