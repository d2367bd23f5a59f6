"""Tests for rvlm.sharding on 8 simulated CPU devices (tests/conftest.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from rvlm import optim
from rvlm import sharding

_INIT = nn.initializers.normal(0.02)


def _param(module, name, shape, names):
  return module.param(name, nn.with_logical_partitioning(_INIT, names), shape)


class _Layer(nn.Module):
  """One scanned decoder-like layer: attention q/kv, MLP, norm."""

  @nn.compact
  def __call__(self, x, _):
    q = _param(self, "q", (8, 4, 2), ("embed", "heads", "head_dim"))
    kv = _param(self, "kv", (8, 1, 2), ("embed", "kv_heads", "head_dim"))
    wi = _param(self, "wi", (8, 16), ("embed", "mlp"))
    wo = _param(self, "wo", (16, 8), ("mlp", "embed"))
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (8,))
    h = jnp.einsum("bld,dhk->blhk", x, q).sum(-1) @ jnp.ones((4, 8)) * jnp.sum(kv)
    h = nn.with_logical_constraint(jnp.tanh(h @ wi), ("act_batch", "act_len", "act_mlp"))
    return x * scale + h @ wo, None


class _Model(nn.Module):
  """Toy VLM covering every kernel family the rules must handle."""

  @nn.compact
  def __call__(self, tokens, patches):
    emb = _param(self, "embedding", (32, 8), ("vocab", "embed"))
    patch = _param(self, "patch", (12, 6), ("patch", "vit_embed"))
    pos = _param(self, "pos", (3, 6), ("vit_pos", "vit_embed"))
    proj = _param(self, "projector", (6, 8), ("vit_embed", "embed"))
    conn = _param(self, "connector", (2, 8, 8), ("modality", "embed", "embed_out"))
    img = (patches @ patch + pos) @ proj
    x = jnp.concatenate([img, emb[tokens]], axis=1) @ conn[0]
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=3, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(name="layers")(x, None)
    return x @ emb.T


GOLDEN = {  # mesh data=2, fsdp=2, tensor=2
    "embedding": P("tensor", "fsdp"),
    "patch": P(None, "fsdp"),
    "pos": P(None, "fsdp"),
    "projector": P("fsdp", None),           # vit_embed wins; embed cannot reuse fsdp
    "connector": P(None, "fsdp", None),     # embed_out never shares embed's axis
    "layers": {
        "q": P(None, "fsdp", "tensor", None),
        "kv": P(None, "fsdp", None, None),  # 1 KV head does not divide tensor=2
        "wi": P(None, "fsdp", "tensor"),
        "wo": P(None, "tensor", "fsdp"),
        "scale": P(None, None),
    },
}


def _mesh_config(**kw):
  return ml_collections.ConfigDict(dict(dict(data=-1, fsdp=1, tensor=1), **kw))


def _inputs(batch=8):
  return jnp.zeros((batch, 4), jnp.int32), jnp.ones((batch, 3, 12))


def _init_fn(tx):
  def init(rng):
    params = _Model().init(rng, *_inputs(1))["params"]
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.fold_in(rng, 1)}
  return init


def _tx():
  return optax.adamw(1e-2)


def _specs(tree):
  return jax.tree.map(lambda s: s.spec, tree)


def test_make_mesh_fills_data_axis():
  mesh = sharding.make_mesh(_mesh_config(fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  mesh = sharding.make_mesh(_mesh_config(data=1, fsdp=-1))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("kw,match", [
    (dict(data=-1, fsdp=-1), "at most one"),
    (dict(data=3), "device count 8"),
    (dict(fsdp=3), "device count 8"),
    (dict(tensor=0), "positive or -1"),
])
def test_make_mesh_errors(kw, match):
  with pytest.raises(ValueError, match=rf"config\.mesh.*{match}"):
    sharding.make_mesh(_mesh_config(**kw))


def test_golden_param_specs_and_optimizer_mirrors_params():
  mesh = sharding.make_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
  abstract, shardings = sharding.abstract_state_and_shardings(
      _init_fn(_tx()), mesh, sharding.LOGICAL_AXIS_RULES, jax.random.key(0))
  assert _specs(shardings["params"]) == GOLDEN
  mu = shardings["opt_state"][0].mu
  assert _specs(mu) == GOLDEN
  assert shardings["step"].spec == P()
  assert abstract["params"]["layers"]["q"].sharding.spec == GOLDEN["layers"]["q"]
  assert abstract["params"]["layers"]["q"].shape == (3, 8, 4, 2)
  # No array ever uses one mesh axis on two dims.
  for spec in jax.tree.leaves(_specs(shardings), is_leaf=lambda x: isinstance(x, P)):
    used = [a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))]
    assert len(used) == len(set(used)), spec


def test_sharded_init_and_jitted_step():
  mesh = sharding.make_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
  rules = sharding.LOGICAL_AXIS_RULES
  tx = _tx()
  init = _init_fn(tx)
  _, shardings = sharding.abstract_state_and_shardings(init, mesh, rules, jax.random.key(0))
  state = sharding.init_sharded(init, shardings, mesh, rules, jax.random.key(0))
  emb = state["params"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert emb.addressable_shards[0].data.shape == (16, 4)  # really split, not replicated

  tokens, patches = _inputs()
  batch = sharding.make_global_batch({"tokens": np.asarray(tokens),
                                      "patches": np.asarray(patches)}, mesh)

  def step(state, batch):
    loss = lambda p: jnp.mean(_Model().apply({"params": p}, batch["tokens"],
                                             batch["patches"]) ** 2)
    grads = jax.grad(loss)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    new = jax.jit(step, in_shardings=(shardings, sharding.data_sharding(mesh)),
                  out_shardings=shardings, donate_argnums=0)(state, batch)
  assert int(new["step"]) == 1
  assert new["rng"].sharding.spec == P()
  assert _specs(jax.tree.map(lambda x: x.sharding, new["params"])) == GOLDEN
  assert not np.allclose(new["params"]["layers"]["wi"], 0.0)


def test_single_device_mesh_uses_same_code_path():
  mesh = sharding.make_mesh(_mesh_config(), devices=jax.devices()[:1])
  init = _init_fn(_tx())
  _, shardings = sharding.abstract_state_and_shardings(
      init, mesh, sharding.LOGICAL_AXIS_RULES, jax.random.key(0))
  state = sharding.init_sharded(init, shardings, mesh, sharding.LOGICAL_AXIS_RULES,
                                jax.random.key(0))
  assert state["params"]["layers"]["wi"].shape == (3, 8, 16)
  assert len(state["params"]["layers"]["wi"].sharding.device_set) == 1


def test_rules_override_from_config():
  rules = sharding.rules_from_config(_mesh_config(rules=[("embed", None), ("norm", "fsdp")]))
  assert rules[:2] == (("embed", None), ("norm", "fsdp"))
  assert sum(1 for name, _ in rules if name == "embed") == 1
  mesh = sharding.make_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
  _, shardings = sharding.abstract_state_and_shardings(
      _init_fn(_tx()), mesh, rules, jax.random.key(0))
  assert shardings["params"]["layers"]["wi"].spec == P(None, None, "tensor")
  assert shardings["params"]["layers"]["scale"].spec == P(None, "fsdp")
  assert sharding.rules_from_config(_mesh_config()) == sharding.LOGICAL_AXIS_RULES


def test_rules_override_rejects_unknown_axis():
  with pytest.raises(ValueError, match=r"config\.mesh\.rules.*model"):
    sharding.rules_from_config(_mesh_config(rules=[("embed", "model")]))


def test_global_batch_layout_and_batch_size_check():
  mesh = sharding.make_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
  local = {"tokens": np.arange(8 * 3).reshape(8, 3), "image": np.ones((8, 2, 2, 1))}
  batch = sharding.make_global_batch(local, mesh)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(batch["tokens"], local["tokens"])
  sharding.check_batch_size(64, mesh)
  with pytest.raises(ValueError, match=r"config\.data\.batch_size=6"):
    sharding.check_batch_size(6, mesh)
  with pytest.raises(ValueError, match=r"config\.data\.batch_size"):
    sharding.make_global_batch({"tokens": np.zeros((6, 3))}, mesh)


def test_optimizer_from_rvlm_optim_gets_shardings():
  # rvlm.optim's masked/partitioned state must also mirror the params' names.
  from configs import base
  c = base.get_config().optim
  c.freeze = (r"patch",)
  tx, _ = optim.make_optimizer(c, 1000)
  mesh = sharding.make_mesh(_mesh_config(data=2, fsdp=2, tensor=2))
  _, shardings = sharding.abstract_state_and_shardings(
      _init_fn(tx), mesh, sharding.LOGICAL_AXIS_RULES, jax.random.key(0))
  specs = jax.tree.leaves(_specs(shardings["opt_state"]), is_leaf=lambda x: isinstance(x, P))
  assert specs.count(P("tensor", "fsdp")) == 2  # embedding mu and nu
  # 'patch' and 'pos' are both (None, fsdp); the frozen 'patch' holds no moments.
  assert specs.count(P(None, "fsdp")) == 2
