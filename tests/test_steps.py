"""Train-step options: gradient accumulation, remat, bf16 compute, skipping non-finite updates."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rvlm import steps
from test_models import init, make_batch, tiny

LOSS = ml_collections.ConfigDict(dict(kind="monotonic", beta=2.0, form="hard", gamma=1.0,
                                      step_weights=()))


def _state(cfg, tx):
  model, params = init(cfg)
  return model, {"params": params, "opt_state": tx.init(params),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0)}


def _grads(model, params, batch, accum=1, loss_cfg=LOSS):
  fn = functools.partial(steps._grads, model=model, loss_cfg=loss_cfg, accum=accum)  # pylint: disable=protected-access
  return jax.jit(fn)(params, batch)


def test_gradient_accumulation_matches_the_full_batch():
  cfg = tiny("connector", 2)
  model, params = init(cfg)
  # Every example has the same number of supervised tokens, so the mean over two
  # microbatches equals the full-batch token mean.
  batch = make_batch(cfg, b=4)
  batch["input_mask"] = jnp.ones_like(batch["input_mask"])
  batch["mask_loss"] = batch["mask_ar"]
  loss1, g1, tok1, _ = _grads(model, params, batch, accum=1)
  loss2, g2, tok2, _ = _grads(model, params, batch, accum=2)
  np.testing.assert_allclose(loss1, loss2, rtol=1e-5)
  np.testing.assert_allclose(tok1, tok2, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_gives_the_same_gradients():
  cfg = tiny("connector", 2)
  model, params = init(cfg)
  batch = make_batch(cfg)
  _, g_plain, _, _ = _grads(model, params, batch)
  for policy in ("full", "dots"):
    remat_model, _ = init(tiny("connector", 2, remat_policy=policy))
    _, g_remat, _, _ = _grads(remat_model, params, batch)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  cfg = tiny("connector", 2, dtype="bfloat16")
  model, params = init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  batch = make_batch(cfg)
  loss_bf16, grads, _, _ = _grads(model, params, batch)
  f32_model, _ = init(tiny("connector", 2))
  loss_f32, _, _, _ = _grads(f32_model, params, batch)
  assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
             for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(loss_bf16, loss_f32, rtol=2e-2)


@pytest.mark.parametrize("skip", [True, False])
def test_non_finite_updates_are_skipped_by_request(skip):
  cfg = tiny("connector", 2)
  tx = optax.adam(1e-3)
  model, state = _state(cfg, tx)
  before = jax.tree.map(np.asarray, state["params"])
  bad_loss = ml_collections.ConfigDict(dict(LOSS, step_weights=(float("nan"), 1.0)))
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   lr_schedule=lambda s: 1e-3, loss_cfg=bad_loss,
                                   skip_nonfinite=skip))
  new, metrics = step(state, make_batch(cfg))
  assert float(metrics["nonfinite"].compute()) == 1.0
  assert int(new["step"]) == 1
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                   jax.tree.leaves(new["params"])))
  assert same == skip
