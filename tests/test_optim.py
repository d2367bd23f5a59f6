"""Tests for rvlm.optim: schedule, decay mask, freezing, clipping, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import base
from rvlm import optim


def _config(**overrides):
  c = base.get_config().optim
  c.update(overrides)
  return c


def _params():
  return {
      "decoder": {"attn": {"q": {"kernel": jnp.full((2, 3), 2.0)}},
                  "norm": {"scale": jnp.full((3,), 2.0)}},
      "connector": {"proj": {"kernel": jnp.full((3, 3), 2.0)}},
      "vit": {"blocks": [{"kernel": jnp.full((2,), 2.0)}, {"bias": jnp.full((2,), 2.0)}]},
  }


def test_param_paths_and_regex_mask():
  paths = optim.param_paths(_params())
  assert paths["decoder"]["attn"]["q"]["kernel"] == "decoder/attn/q/kernel"
  assert paths["vit"]["blocks"][1]["bias"] == "vit/blocks/1/bias"
  mask = optim.regex_mask(_params(), (r".*scale$", r"vit/.*"))
  assert jax.tree.leaves(mask) == jax.tree.leaves(
      {"connector": {"proj": {"kernel": False}},
       "decoder": {"attn": {"q": {"kernel": False}}, "norm": {"scale": True}},
       "vit": {"blocks": [{"kernel": True}, {"bias": True}]}})
  # fullmatch: a bare name does not match inside a longer path.
  assert not any(jax.tree.leaves(optim.regex_mask(_params(), ("scale",))))


def test_param_paths_see_through_boxes():
  boxed = {"a": nn.LogicallyPartitioned(jnp.ones((2, 2)), ("embed", "mlp"))}
  assert optim.param_paths(boxed) == {"a": "a"}


def test_cosine_schedule_values():
  c = _config(lr=1.0, warmup_steps=10, end_lr_factor=0.1, schedule="cosine")
  _, sched = optim.make_optimizer(c, total_steps=110)
  np.testing.assert_allclose(
      [sched(0), sched(5), sched(10), sched(60), sched(110)],
      [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], rtol=1e-5, atol=1e-6)


def test_constant_schedule_and_no_warmup():
  c = _config(lr=0.5, warmup_steps=0, schedule="constant")
  _, sched = optim.make_optimizer(c, total_steps=10)
  np.testing.assert_allclose([sched(0), sched(10)], [0.5, 0.5])


def test_weight_decay_mask():
  # Zero gradients: Adam's direction is 0, so the update is the decay term only.
  c = _config(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5,
              grad_clip=0.0, no_decay=(r".*scale$", r".*connector.*"))
  tx, _ = optim.make_optimizer(c, total_steps=10)
  params = _params()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  decayed = -0.1 * 0.5 * 2.0
  np.testing.assert_allclose(updates["decoder"]["attn"]["q"]["kernel"], decayed, rtol=1e-6)
  np.testing.assert_allclose(updates["vit"]["blocks"][1]["bias"], decayed, rtol=1e-6)
  np.testing.assert_allclose(updates["decoder"]["norm"]["scale"], 0.0)
  np.testing.assert_allclose(updates["connector"]["proj"]["kernel"], 0.0)


def _two_steps(tx, params, grads):
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
  return updates, state


def test_grad_clip_is_applied_before_adam():
  # Adam is scale-invariant per step, so clipping only shows from the second step on:
  # a big clipped first gradient weighs less against a small second one.
  params = {"w": jnp.zeros((4,))}
  grads = [{"w": jnp.full((4,), 100.0)}, {"w": jnp.full((4,), -0.1)}]
  kw = dict(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.0)
  clipped, _ = _two_steps(optim.make_optimizer(_config(grad_clip=1.0, **kw), 10)[0],
                          params, grads)
  unclipped, _ = _two_steps(optim.make_optimizer(_config(grad_clip=0.0, **kw), 10)[0],
                            params, grads)
  ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1.0, b1=0.9, b2=0.95,
                                                                 weight_decay=0.0))
  expected, _ = _two_steps(ref, params, grads)
  np.testing.assert_allclose(clipped["w"], expected["w"], rtol=1e-6)
  assert not np.allclose(clipped["w"], unclipped["w"])


def test_freeze_zero_updates_no_moments_and_no_clip_share():
  kw = dict(lr=1.0, warmup_steps=0, schedule="constant", weight_decay=0.1, grad_clip=1.0)
  tx, _ = optim.make_optimizer(_config(freeze=(r"vit/.*",), **kw), 10)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  grads["vit"]["blocks"][0]["kernel"] = jnp.full((2,), 1e6)  # would dominate the norm
  updates, state = _two_steps(tx, params, [grads, grads])
  for leaf in jax.tree.leaves(updates["vit"]):
    np.testing.assert_array_equal(leaf, 0.0)
  # Moments exist only for trainable params.
  n_moment_leaves = sum(
      x.size for x in jax.tree.leaves(state) if hasattr(x, "ndim") and x.ndim > 0)
  n_trainable = sum(x.size for k, v in params.items() if k != "vit"
                    for x in jax.tree.leaves(v))
  assert n_moment_leaves == 2 * n_trainable
  # Trainable updates match an optimizer that never saw the frozen params at all.
  plain, _ = optim.make_optimizer(_config(**kw), 10)
  sub = {k: v for k, v in params.items() if k != "vit"}
  sub_grads = {k: v for k, v in grads.items() if k != "vit"}
  expected, _ = _two_steps(plain, sub, [sub_grads, sub_grads])
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves({k: updates[k] for k in sub})):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_boxed_params_give_named_moments():
  boxed = {"dense": {"kernel": nn.LogicallyPartitioned(jnp.ones((2, 3)), ("embed", "mlp")),
                     "bias": jnp.ones((3,))}}
  tx, _ = optim.make_optimizer(_config(freeze=(r".*bias$",)), 1000)
  abstract = jax.eval_shape(tx.init, boxed)
  specs = jax.tree.leaves(nn.get_partition_spec(abstract),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert specs.count(jax.sharding.PartitionSpec("embed", "mlp")) == 2  # mu and nu
  # The same tx runs on the unboxed tree the trainer passes.
  plain = nn.unbox(boxed)
  updates, _ = tx.update(plain, tx.init(plain), plain)
  assert updates["dense"]["kernel"].shape == (2, 3)


@pytest.mark.parametrize("field,value,total", [
    ("name", "sgdx", 1000),
    ("schedule", "linear", 1000),
    ("lr", -1.0, 1000),
    ("warmup_steps", 1001, 1000),
    ("end_lr_factor", 2.0, 1000),
    ("b2", 1.0, 1000),
    ("weight_decay", -0.1, 1000),
    ("grad_clip", -1.0, 1000),
    ("no_decay", ("(unclosed",), 1000),
    ("freeze", ("[bad",), 1000),
])
def test_bad_config_names_field(field, value, total):
  c = _config(**{field: value})
  with pytest.raises(ValueError, match=rf"config\.optim\.{field}"):
    optim.make_optimizer(c, total)


def test_bad_total_steps():
  with pytest.raises(ValueError, match=r"config\.train\.total_steps"):
    optim.make_optimizer(_config(), 0)


def test_base_config_minimises_a_quadratic():
  # Base config with a larger lr: Adam moves ~lr per step and the optimum is 3 away.
  tx, _ = optim.make_optimizer(_config(lr=0.1), total_steps=300)
  params = {"layer": {"kernel": jnp.full((4,), 3.0), "scale": jnp.full((4,), -2.0)}}
  loss = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for _ in range(300):
    params, state = step(params, state)
  assert float(loss(params)) < 0.05 * 52.0
