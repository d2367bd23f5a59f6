"""Tests for rvlm.checkpointing on an 8-device CPU mesh with sharded arrays."""
import glob
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import base
from rvlm import checkpointing
from rvlm import optim

# Tensorstore reports failed reads of broken checkpoints from callbacks that can run
# after their event loop closed; that noise is not a test result.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _state(mesh, value=0.0, width=8):
  """A train state like the trainer's: sharded params, masked optax state, key."""
  sh = NamedSharding(mesh, P("fsdp", "tensor"))
  params = {"dec": {"kernel": jax.device_put(jnp.arange(8.0 * width).reshape(8, width)
                                             + value, sh)},
            "vit": {"scale": jnp.ones((4,)) * value}}
  c = base.get_config().optim
  c.freeze = (r"vit/.*",)  # frozen params leave empty nodes in the optimizer state
  tx, _ = optim.make_optimizer(c, 100)
  opt_state = tx.init(params)
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(int(value)),
          "rng": jax.random.key(int(value))}


def _abstract(state, sharding=None):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding),
      state)


def _assert_trees_equal(a, b):
  unkey = lambda t: jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, t)
  a, b = unkey(a), unkey(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _ckpt(tmp_path, **kw):
  return checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(tmp_path)), **kw)


def test_round_trip_sharded_state_and_data_state(tmp_path, mesh):
  state = _state(mesh, 3.0)
  config = ml_collections.ConfigDict({"model": {"width": 8}, "tags": ("a", "b")})
  with _ckpt(tmp_path, config=config) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(3, state, data_state={"next_index": 17, "seed": [1, 2]})
    ckpt.wait()
    # Restore into a different layout: arrays follow the abstract state's shardings.
    target = _abstract(state)
    target["params"]["dec"]["kernel"] = jax.ShapeDtypeStruct(
        (8, 8), jnp.float32, sharding=NamedSharding(mesh, P(None, "data")))
    restored, data_state, step = ckpt.restore(target)
    assert step == 3
    assert data_state == {"next_index": 17, "seed": [1, 2]}
    _assert_trees_equal(restored, state)
    assert restored["params"]["dec"]["kernel"].sharding.spec == P(None, "data")
    adam = restored["opt_state"].inner_states["train"].inner_state[1][0]
    assert adam.mu["dec"]["kernel"].sharding.spec == P("fsdp", "tensor")
    meta = ckpt.meta(3)
    assert meta["config"]["model"]["width"] == 8 and meta["rvlm_version"] == "0.1.0"


def test_bytes_and_missing_data_state(tmp_path, mesh):
  state = _state(mesh)
  with _ckpt(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state, data_state=b'{"pos": 5}\x00\xff')
    ckpt.save(2, state)
    assert ckpt.restore(_abstract(state), step=1)[1] == b'{"pos": 5}\x00\xff'
    assert ckpt.restore(_abstract(state), step=2)[1] is None


def test_keep_n_and_resume_picks_latest(tmp_path, mesh):
  with _ckpt(tmp_path, keep=2) as ckpt:
    for s in range(1, 5):
      ckpt.save(s, _state(mesh, float(s)), data_state={"s": s})
    assert not ckpt.save(4, _state(mesh, 99.0))  # never overwrites an existing step
  ckpt = _ckpt(tmp_path, keep=2)  # a fresh process resuming
  assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
  restored, data_state, step = ckpt.restore(_abstract(_state(mesh)))
  assert (step, data_state) == (4, {"s": 4})
  _assert_trees_equal(restored, _state(mesh, 4.0))
  ckpt.close()


def _corrupt(step_dir, how):
  """Breaks a committed step the way a crash or a full disk can."""
  state = os.path.join(step_dir, "state")
  if how == "truncate":  # the OCDBT manifest is read by every restore
    path = os.path.join(state, "manifest.ocdbt")
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  else:  # delete every array data file
    for path in glob.glob(os.path.join(state, "**", "d", "*"), recursive=True):
      os.remove(path)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupt_latest_falls_back_and_tmp_dirs_ignored(tmp_path, mesh, caplog, how):
  ckpt = _ckpt(tmp_path, keep=3)
  for s in (1, 2):
    ckpt.save(s, _state(mesh, float(s)), data_state={"s": s})
  ckpt.close()
  root = checkpointing.checkpoint_dir(str(tmp_path))
  _corrupt(os.path.join(root, "2"), how)
  os.makedirs(os.path.join(root, "3.orbax-checkpoint-tmp-1700000000", "state"))
  good_files = sorted(os.listdir(os.path.join(root, "1", "state")))

  ckpt = _ckpt(tmp_path, keep=3)
  assert ckpt.latest_step() == 2  # the uncommitted step 3 is not listed
  with caplog.at_level(logging.WARNING):
    restored, data_state, step = ckpt.restore(_abstract(_state(mesh)))
  assert (step, data_state) == (1, {"s": 1})
  _assert_trees_equal(restored, _state(mesh, 1.0))
  assert any("unreadable" in r.getMessage() for r in caplog.records)
  # The good step is untouched, the broken one set aside (not deleted), tmp kept.
  assert sorted(os.listdir(os.path.join(root, "1", "state"))) == good_files
  assert os.path.isdir(os.path.join(root, "corrupt_step_2"))
  assert os.path.isdir(os.path.join(root, "3.orbax-checkpoint-tmp-1700000000"))
  # The run can continue and save step 2 again.
  assert ckpt.all_steps() == [1]
  ckpt.save(2, _state(mesh, 2.0))
  ckpt.wait()
  assert ckpt.restore(_abstract(_state(mesh)))[2] == 2
  ckpt.close()


def test_all_corrupt_raises_and_renames_nothing(tmp_path, mesh):
  ckpt = _ckpt(tmp_path)
  ckpt.save(1, _state(mesh))
  ckpt.close()
  root = checkpointing.checkpoint_dir(str(tmp_path))
  _corrupt(os.path.join(root, "1"), "truncate")
  with pytest.raises(RuntimeError, match="no checkpoint .* restores"):
    _ckpt(tmp_path).restore(_abstract(_state(mesh)))
  assert os.listdir(root) == ["1"]


def test_shape_mismatch_names_paths_and_shapes(tmp_path, mesh):
  with _ckpt(tmp_path) as ckpt:
    ckpt.save(1, _state(mesh))
  ckpt = _ckpt(tmp_path)
  wider = _abstract(_state(mesh, width=16))
  with pytest.raises(ValueError, match=r"params/dec/kernel: checkpoint \(8, 8\) vs model "
                                       r"\(8, 16\)") as e:
    ckpt.restore(wider)
  assert os.path.isdir(os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), "1"))
  extra = _abstract(_state(mesh))
  extra["params"]["new"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  with pytest.raises(ValueError, match=r"params/new: missing in checkpoint"):
    ckpt.restore(extra)
  assert "opt_state" in str(e.value)  # Adam moments are listed too
  ckpt.close()


def test_load_params_from_workdir_and_step_dir(tmp_path, mesh):
  state = _state(mesh, 5.0)
  with _ckpt(tmp_path, keep=2) as ckpt:
    ckpt.save(5, state)
  abstract = _abstract(state["params"], sharding=NamedSharding(mesh, P()))
  for path in (str(tmp_path), checkpointing.checkpoint_dir(str(tmp_path)),
               os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), "5")):
    params = checkpointing.load_params(path, abstract)
    _assert_trees_equal(params, state["params"])
    assert params["dec"]["kernel"].sharding.spec == P()


def test_load_params_errors(tmp_path, mesh):
  missing = str(tmp_path / "nope")
  abstract = _abstract(_state(mesh)["params"])
  with pytest.raises(FileNotFoundError, match=r"config\.init_from.*nope"):
    checkpointing.load_params(missing, abstract)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
    checkpointing.load_params(str(tmp_path / "empty"), abstract)
  with _ckpt(tmp_path) as ckpt:
    ckpt.save(1, _state(mesh))
  wider = _abstract(_state(mesh, width=16)["params"])
  with pytest.raises(ValueError, match=r"params/dec/kernel: checkpoint \(8, 8\) vs model "
                                       r"\(8, 16\)"):
    checkpointing.load_params(str(tmp_path), wider)


def test_load_params_allow_new_keeps_fresh_values_for_new_modules(tmp_path, mesh):
  # A trained standard model made recursive: the checkpoint lacks the connector.
  saved = _state(mesh, value=3.0)
  with _ckpt(tmp_path) as ckpt:
    ckpt.save(1, saved)
  fresh = dict(saved["params"], dec=dict(saved["params"]["dec"], kernel=saved["params"]["dec"]["kernel"] * 0),
               connector={"proj": jnp.full((8, 8), 7.0)})
  abstract = _abstract(fresh, sharding=NamedSharding(mesh, P()))
  with pytest.raises(ValueError, match=r"params/connector/proj: missing in checkpoint"):
    checkpointing.load_params(str(tmp_path), abstract)
  with pytest.raises(ValueError, match=r"params/connector/proj: missing in checkpoint"):
    checkpointing.load_params(str(tmp_path), abstract, fresh, allow_new=(r"vit/.*",))
  params = checkpointing.load_params(str(tmp_path), abstract, fresh, allow_new=(r".*connector.*",))
  np.testing.assert_array_equal(params["connector"]["proj"], fresh["connector"]["proj"])
  np.testing.assert_array_equal(params["dec"]["kernel"], saved["params"]["dec"]["kernel"])
  np.testing.assert_array_equal(params["vit"]["scale"], saved["params"]["vit"]["scale"])
