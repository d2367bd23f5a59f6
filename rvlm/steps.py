"""Pure train and eval step functions; `rvlm.train` jit-compiles them with shardings.

The train state is a plain pytree {params, opt_state, step, rng}.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from rvlm import losses
from rvlm import metrics as metrics_lib


def forward_losses(model, params, batch, num_steps=None):
  """Per-step token losses and correctness, each [R, B, T-1], plus the model output."""
  out = model.apply({"params": params}, batch, num_steps=num_steps)
  logits_fn = lambda h: model.apply({"params": params}, h, method=model.logits)  # noqa: E731
  tok_loss, correct = losses.per_step_token_losses(logits_fn, out["hidden"], batch["tokens"])
  return tok_loss, correct, out


def _loss_fn(params, batch, *, model, loss_cfg):
  tok_loss, correct, _ = forward_losses(model, params, batch)
  total, aux = losses.recursion_loss(
      tok_loss, batch["mask_loss"][:, 1:], kind=loss_cfg.kind, beta=loss_cfg.beta,
      form=loss_cfg.form, gamma=loss_cfg.gamma, step_weights=tuple(loss_cfg.step_weights))
  return total, (tok_loss, correct, aux["regressions"])


def _split_micro(batch, n):
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def _grads(params, batch, *, model, loss_cfg, accum):
  """Loss and gradients, averaged over `accum` sequential microbatches."""
  grad_fn = jax.value_and_grad(functools.partial(_loss_fn, model=model, loss_cfg=loss_cfg),
                               has_aux=True)
  if accum == 1:
    (total, (tok, correct, _)), grads = grad_fn(params, batch)
    return total, grads, tok, correct

  def body(acc, micro):
    (total, (tok, correct, _)), g = grad_fn(params, micro)
    acc = jax.tree.map(jnp.add, acc, (total, g))
    return acc, (tok, correct)

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (total, grads), (tok, correct) = jax.lax.scan(body, zeros, _split_micro(batch, accum))
  merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, x.shape[-1])  # noqa: E731
  return total / accum, jax.tree.map(lambda g: g / accum, grads), merge(tok), merge(correct)


def connector_alpha(params):
  """The connector's residual scale, or None (modes none / vanilla)."""
  return params.get("recursion", {}).get("step", {}).get("connector", {}).get("alpha")


def train_step(state, batch, *, model, tx, lr_schedule, loss_cfg, accum=1, skip_nonfinite=False):
  """One optimizer update. Returns (new_state, metrics dict of clu metrics)."""
  params = state["params"]
  total, grads, tok, correct = _grads(params, batch, model=model, loss_cfg=loss_cfg, accum=accum)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
  new_state = dict(state, params=new_params, opt_state=opt_state, step=state["step"] + 1)

  mask = batch["mask_loss"][:, 1:]
  # 'nonfinite' is averaged (a scalar counts once per step), so any bad step in a
  # logging window shows up as a value > 0.
  averages = {"nonfinite": 1.0 - finite.astype(jnp.float32)}
  last = {"loss": total, "lr": lr_schedule(state["step"]), "grad_norm": grad_norm}
  rose = jnp.concatenate([jnp.zeros_like(tok[:1], bool), tok[1:] > tok[:-1]], 0)
  for r in range(tok.shape[0]):
    averages[f"loss/r{r + 1}"] = tok[r]
    averages[f"accuracy/r{r + 1}"] = correct[r]
    if r:
      averages[f"regressions/r{r + 1}"] = rose[r]
  alpha = connector_alpha(params)
  if alpha is not None:  # watch the scale: at 0 recursion has switched itself off
    last["connector/alpha_mean_abs"] = jnp.mean(jnp.abs(alpha))
  return new_state, metrics_lib.make_metrics(averages=averages, last_values=last, mask=mask)


def eval_step(params, batch, *, model, num_steps=None):
  """Teacher-forced evaluation at every depth from one pass of R steps.

  Returns per-example exact match [R, B] and per-step sums for diagnostics: hidden-state
  norm of each step's final-layer output and input, and the linear CKA of each step's
  input with the step-1 input E_0 (the paper's Fig. 1), all over real tokens.
  """
  tok_loss, correct, out = forward_losses(model, params, batch, num_steps)
  mask = batch["mask_loss"][:, 1:]
  exact = losses.exact_match(correct, mask) & (batch["example_mask"][None] > 0)
  ex_mask = batch["example_mask"].astype(jnp.float32)
  token_loss = jnp.sum(tok_loss * mask * ex_mask[None, :, None], axis=(1, 2))

  inputs = out["step_inputs"]                                  # [R, B, N, d]
  nv = inputs.shape[2] - batch["tokens"].shape[1]
  real = jnp.concatenate([jnp.broadcast_to(batch["image_mask"][:, None], (inputs.shape[1], nv)),
                          batch["input_mask"]], 1).astype(jnp.float32) * ex_mask[:, None]
  norm = lambda h: jnp.sum(jnp.linalg.norm(h.astype(jnp.float32), axis=-1) * real)  # noqa: E731
  text_real = real[:, nv:]
  hidden_norm = jax.vmap(lambda h: jnp.sum(
      jnp.linalg.norm(h.astype(jnp.float32), axis=-1) * text_real))(out["hidden"])
  return {
      "exact": exact,
      "token_loss_sum": token_loss,
      "token_count": jnp.sum(mask * ex_mask[:, None]),
      "input_norm_sum": jax.vmap(norm)(inputs),
      "hidden_norm_sum": hidden_norm,
      "real_tokens": jnp.sum(real),
      "real_text_tokens": jnp.sum(text_real),
      "cka_with_e0": jax.vmap(lambda h: metrics_lib.linear_cka(
          h.reshape(-1, h.shape[-1]), inputs[0].reshape(-1, h.shape[-1]), real.reshape(-1)))(inputs),
  }
