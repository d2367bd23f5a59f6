"""Every mesh layout trains the same trajectory: the trainer's own step (train.build_train_step)
on 8 simulated devices, against one device, for five steps of the debug config."""
import jax
from flax import linen as nn
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import debug
from rvlm import data as data_lib
from rvlm import metrics
from rvlm import sharding
from rvlm import train

STEPS = 5
# The same sums in another order: data/fsdp split the batch's reduction, tensor splits
# matmuls' inner sums.
LOSS_RTOL = 1e-5
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (2, 4, 1)]


def _config(data, fsdp, tensor):
  c = debug.get_config()
  c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  return c


@pytest.fixture(scope="module")
def batches():
  it = data_lib.build_train_iterator(_config(1, 1, 1))
  return [next(it) for _ in range(STEPS)]


def _train(config, batches, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_from_config(config.mesh)
  built = train.build_train_step(config, mesh, rules)
  state = sharding.init_sharded(built.init_state, built.state_shardings, mesh, rules, built.rng)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for b in batches:
      state, m = built.train_fn(state, sharding.make_global_batch(b, mesh))
      losses.append(metrics.compute_metrics(m)["loss"])
  return losses, state


@pytest.fixture(scope="module")
def one_device(batches):
  losses, _ = _train(_config(1, 1, 1), batches, jax.devices()[:1])
  return losses


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_layout_gives_the_one_device_losses(shape, batches, one_device):
  losses, state = _train(_config(*shape), batches, jax.devices())
  assert len(set(one_device)) == STEPS  # it trains: the losses move
  print(f"mesh {shape}: largest relative loss difference "
        f"{np.max(np.abs(np.array(losses) / one_device - 1)):.1e}")
  np.testing.assert_allclose(losses, one_device, rtol=LOSS_RTOL)

  # Params carry the PartitionSpecs the rules give: the MLP's (layers, embed, mlp)
  # kernel on (-, fsdp, tensor), each device holding its 1 / (fsdp * tensor) share.
  _, fsdp, tensor = shape
  layer = state["params"]["recursion"]["step"]["stack"]["layers"]["layer"]
  up = layer["mlp"]["up"]["kernel"]
  assert up.sharding.spec == P(None, "fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (up.shape[0], up.shape[1] // fsdp,
                                                 up.shape[2] // tensor)
  # The optimizer's moments are sharded like their params.
  mu = jax.tree.leaves(state["opt_state"], is_leaf=lambda x: hasattr(x, "sharding"))
  assert any(m.sharding == up.sharding and m.shape == up.shape for m in mu)
  assert state["step"].sharding.is_fully_replicated
