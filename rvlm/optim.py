"""Optimizer from `config.optim`: AdamW, warmup + cosine, clipping, decay/freeze masks.

  tx, lr_schedule = make_optimizer(config.optim, config.train.total_steps)

The returned `tx` works on plain (unboxed) param trees, which is what the train step
passes. It also accepts trees of `nn.LogicallyPartitioned` boxes, so
`jax.eval_shape(tx.init, boxed_params)` yields an optimizer state whose moments carry
the params' logical axis names (rvlm.sharding derives their shardings from that).

Params are selected by regexes over their '/'-joined path, e.g.
`decoder/layers/attn/q/kernel`; `re.fullmatch` is used, so write `.*bias$`-style
patterns (a leading `.*` is needed to match anywhere).
"""
import re

import jax
import optax
from flax import linen as nn

from rvlm.utils import tree as tree_util

_SCHEDULES = ("cosine", "constant")
_NAMES = ("adamw",)


def _is_box(x):
  # Boxes are pytree nodes; treating them as leaves keeps their path free of the
  # box's own `value` attribute and lets masks be prefixes of boxed trees.
  return isinstance(x, nn.meta.AxisMetadata)


def param_paths(tree):
  """Returns a tree of the same structure with each leaf's '/'-joined path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: tree_util.path_str(path), tree, is_leaf=_is_box)


def _compile(regexes, field):
  try:
    return [re.compile(r) for r in regexes]
  except re.error as e:
    raise ValueError(f"{field}: invalid regex ({e}) in {tuple(regexes)!r}") from e


def regex_mask(tree, regexes):
  """Bool tree: True where the leaf's path fully matches any of `regexes`."""
  compiled = _compile(regexes, "regex_mask")
  return jax.tree.map(lambda p: any(r.fullmatch(p) for r in compiled), param_paths(tree))


def _validate(c, total_steps):
  """Raises ValueError naming the offending `config.optim.*` field."""
  if c.name not in _NAMES:
    raise ValueError(f"config.optim.name={c.name!r} is not one of {_NAMES}")
  if c.schedule not in _SCHEDULES:
    raise ValueError(f"config.optim.schedule={c.schedule!r} is not one of {_SCHEDULES}")
  if total_steps <= 0:
    raise ValueError(f"config.train.total_steps={total_steps} must be positive")
  if c.lr < 0:
    raise ValueError(f"config.optim.lr={c.lr} must be >= 0")
  if not 0 <= c.warmup_steps <= total_steps:
    raise ValueError(f"config.optim.warmup_steps={c.warmup_steps} must be in "
                     f"[0, config.train.total_steps={total_steps}]")
  if not 0.0 <= c.end_lr_factor <= 1.0:
    raise ValueError(f"config.optim.end_lr_factor={c.end_lr_factor} must be in [0, 1]")
  for field in ("b1", "b2"):
    if not 0.0 <= c[field] < 1.0:
      raise ValueError(f"config.optim.{field}={c[field]} must be in [0, 1)")
  if c.weight_decay < 0:
    raise ValueError(f"config.optim.weight_decay={c.weight_decay} must be >= 0")
  if c.grad_clip < 0:
    raise ValueError(f"config.optim.grad_clip={c.grad_clip} must be >= 0 (0 = off)")
  _compile(c.no_decay, "config.optim.no_decay")
  _compile(c.freeze, "config.optim.freeze")


def make_schedule(optim_config, total_steps):
  """Linear warmup from 0 to lr, then cosine decay to end_lr_factor*lr (or constant)."""
  c = optim_config
  warmup = int(c.warmup_steps)
  if c.schedule == "cosine":
    # max(.., 1): warmup == total_steps leaves no decay phase; optax needs > 0 steps.
    main = optax.cosine_decay_schedule(c.lr, max(total_steps - warmup, 1), alpha=c.end_lr_factor)
  else:
    main = optax.constant_schedule(c.lr)
  if warmup == 0:
    return main
  ramp = optax.linear_schedule(0.0, c.lr, warmup)
  return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(optim_config, total_steps):
  """Returns (tx, lr_schedule) for `config.optim` and `config.train.total_steps`.

  Order: clip by global norm -> AdamW (decay masked by `no_decay`). Params matching
  `freeze` are routed to `optax.set_to_zero` before any of that, so they neither move
  nor count towards the clipping norm, and hold no Adam moments.
  """
  c = optim_config
  _validate(c, total_steps)
  schedule = make_schedule(c, total_steps)
  no_decay, freeze = tuple(c.no_decay), tuple(c.freeze)

  # Callable masks are evaluated on whatever tree tx sees (plain or boxed params).
  decay_mask = lambda params: jax.tree.map(lambda m: not m, regex_mask(params, no_decay))
  parts = []
  if c.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(c.grad_clip))
  parts.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay,
                           mask=decay_mask))
  tx = optax.chain(*parts)

  if freeze:
    labels = lambda params: jax.tree.map(
        lambda m: "frozen" if m else "train", regex_mask(params, freeze))
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
