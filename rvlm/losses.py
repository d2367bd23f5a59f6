"""Per-step next-token losses and the Monotonic Recursion Loss.

The model returns the final-layer hidden states of every recursion step, [R, B, T, d].
`per_step_token_losses` applies the shared head one step at a time inside a
rematerialised `lax.scan`, so at most one step's B x T x V logits exist at once, in the
forward and in the backward pass.

Monotonic Recursion Loss (method.md):
  w_i^(r) = beta  if r > 1 and sg(l_i^(r)) > sg(l_i^(r-1))  else 1
  L = sum_r lambda_r * sum_i m_i w_i^(r) l_i^(r) / sum_i m_i
The weights are built from stop-gradient copies, so no gradient flows through the
comparison. beta = 1 is plain deep supervision. The `soft` form replaces the weights by
l^(r) + gamma * SiLU(l^(r) - sg(l^(r-1))).
"""
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

KINDS = ("monotonic", "final_only")
FORMS = ("hard", "soft")


def check_loss_config(cfg, num_steps: int) -> None:
  if cfg.kind not in KINDS:
    raise ValueError(f"config.loss.kind={cfg.kind!r} is unknown; choose one of {KINDS}")
  if cfg.form not in FORMS:
    raise ValueError(f"config.loss.form={cfg.form!r} is unknown; choose one of {FORMS}")
  if cfg.beta < 1.0:
    raise ValueError(f"config.loss.beta={cfg.beta} must be >= 1 (beta = 1: no penalty)")
  if cfg.step_weights and len(cfg.step_weights) != num_steps:
    raise ValueError(f"config.loss.step_weights has {len(cfg.step_weights)} entries; "
                     f"config.model.recursion.num_steps is {num_steps}")


def token_cross_entropy(logits, targets):
  """logits [..., V] (float32), targets [...] -> (loss [...], correct [...])."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  loss = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == targets
  return loss, correct


def per_step_token_losses(logits_fn: Callable, hidden, tokens):
  """Next-token losses at every step: position t predicts tokens[t + 1].

  hidden: [R, B, T, d]; tokens: [B, T]. Returns (loss, correct), each [R, B, T - 1].
  """
  targets = tokens[:, 1:]

  @jax.checkpoint
  def one_step(h):
    return token_cross_entropy(logits_fn(h[:, :-1]), targets)

  _, (loss, correct) = jax.lax.scan(lambda c, h: (c, one_step(h)), None, hidden)
  return loss, correct


def _masked_mean(x, mask):
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def recursion_loss(token_losses, mask, *, kind="monotonic", beta=2.0, form="hard", gamma=1.0,
                   step_weights: Sequence[float] = ()):
  """Total loss from per-step token losses.

  token_losses: [R, ...] per-token losses at steps 1..R; mask: [...] (1 = supervised).
  Returns (total, aux) with aux['loss_per_step'] [R] (unweighted mean CE) and
  aux['regressions'] [R] (share of supervised tokens whose loss rose vs step r-1; 0 at r=1).
  """
  num_steps = token_losses.shape[0]
  mask = mask.astype(jnp.float32)
  lam = jnp.asarray(step_weights if len(step_weights) else [1.0] * num_steps, jnp.float32)
  per_step = jax.vmap(lambda l: _masked_mean(l, mask))(token_losses)

  sg = jax.lax.stop_gradient(token_losses)
  rose = jnp.concatenate([jnp.zeros_like(sg[:1], bool), sg[1:] > sg[:-1]], axis=0)
  regressions = jax.vmap(lambda r: _masked_mean(r.astype(jnp.float32), mask))(rose)

  if kind == "final_only":
    total = per_step[-1]
  elif form == "hard":
    w = jnp.where(rose, beta, 1.0)
    total = jnp.sum(lam * jax.vmap(lambda l, w_: _masked_mean(l * w_, mask))(token_losses, w))
  else:
    penalty = gamma * jax.nn.silu(token_losses[1:] - sg[:-1])
    soft = jnp.concatenate([token_losses[:1], token_losses[1:] + penalty], axis=0)
    total = jnp.sum(lam * jax.vmap(lambda l: _masked_mean(l, mask))(soft))
  return total, {"loss_per_step": per_step, "regressions": regressions}


def exact_match(correct, mask):
  """Per example: every supervised token right. correct [..., B, T], mask [B, T] -> [..., B]."""
  mask = mask.astype(bool)
  return jnp.all(correct | ~mask, axis=-1) & jnp.any(mask, axis=-1)
