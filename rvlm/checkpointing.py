"""Orbax checkpoints of the train state and the data iterator, with a safe resume order.

  ckpt = Checkpointer(checkpoint_dir(workdir), keep=config.train.keep_checkpoints,
                      config=config)
  if ckpt.latest_step() is not None:
    state, data_state, step = ckpt.restore(abstract_state)   # sharded like `abstract`
  ...
  ckpt.save(step, state, data_state=train_iter.get_state())
  ...
  ckpt.close()   # waits for the last async save

Each step directory holds three items: 'state' (the {params, opt_state, step, rng}
pytree, saved shard-by-shard), 'data' (the grain iterator state as JSON) and 'meta'
(config and rvlm version, for humans and for `load_params` error messages).

Resume order: the newest step that restores cleanly. A step whose files were truncated
or deleted is skipped with a warning; once an older step restores, the broken newer
ones are renamed to `corrupt_step_<N>` (orbax ignores that name) so the run can save
step N again. Nothing is ever deleted here, and nothing is renamed unless a good step
was found. Uncommitted `<N>.orbax-checkpoint-tmp-*` directories are never listed.
"""
import base64
import importlib.metadata
import json
import os
import re

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from rvlm.utils import tree as tree_util

CHECKPOINT_SUBDIR = "checkpoints"
_MAX_LISTED = 20  # mismatching paths shown in an error; the rest are counted


def checkpoint_dir(workdir):
  """Where a run in `workdir` keeps its checkpoints."""
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


def _rvlm_version():
  try:
    return importlib.metadata.version("rvlm")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


def _config_json(config):
  if config is None:
    return None
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=repr))


def _encode_data_state(data_state):
  """Wraps a grain iterator state (dict, bytes or None) in a JSON object."""
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, (bytes, bytearray)):
    return {"kind": "bytes", "value": base64.b64encode(bytes(data_state)).decode("ascii")}
  return {"kind": "json", "value": data_state}


def _decode_data_state(obj):
  if obj is None or obj["kind"] == "none":
    return None
  if obj["kind"] == "processes":  # one state per process (see _all_processes)
    states, count = obj["value"], jax.process_count()
    if len(states) != count:
      logging.warning("checkpoint: the data iterator state was saved by %d processes and "
                      "this run has %d; the input stream restarts from its beginning (the "
                      "model state is restored)", len(states), count)
      return None
    return _decode_data_state(states[jax.process_index()])
  if obj["kind"] == "bytes":
    return base64.b64decode(obj["value"])
  return obj["value"]


def _all_processes(encoded):
  """Every process's encoded data state, gathered into each process.

  Orbax writes JSON items from the primary process only, but each process has its own
  position in its own shard of the stream (bad rows are skipped per process), so the
  item holds them all and each process restores its own.
  """
  if jax.process_count() == 1:
    return encoded
  text = np.frombuffer(json.dumps(encoded).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(text.size))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:text.size] = text
  rows = multihost_utils.process_allgather(padded)
  return {"kind": "processes",
          "value": [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]}


def _shapes_by_path(tree):
  """{'a/b/0/c': shape} for every array-like leaf; containers of any kind agree.

  Orbax metadata turns tuples into lists and NamedTuples into dicts, and stores
  typed PRNG keys as their uint32 key data, so both trees are reduced to this form.
  """
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      shape = jax.eval_shape(jax.random.key_data, leaf).shape
    out[tree_util.path_str(path)] = tuple(shape)
  return out


def check_shapes(saved_tree, abstract_tree, where):
  """Raises ValueError naming every path whose shape or presence differs."""
  saved, want = _shapes_by_path(saved_tree), _shapes_by_path(abstract_tree)
  problems = []
  for path in sorted(set(saved) | set(want)):
    if path not in saved:
      problems.append(f"  {path}: missing in checkpoint (model expects {want[path]})")
    elif path not in want:
      problems.append(f"  {path}: in checkpoint {saved[path]} but not in the model")
    elif saved[path] != want[path]:
      problems.append(f"  {path}: checkpoint {saved[path]} vs model {want[path]}")
  if problems:
    # Params first: they are what a config change usually breaks.
    problems.sort(key=lambda p: not p.strip().startswith("params"))
    extra = len(problems) - _MAX_LISTED
    listed = problems[:_MAX_LISTED] + ([f"  ... and {extra} more"] if extra > 0 else [])
    raise ValueError(f"{where} does not match the model/optimizer "
                     f"({len(problems)} mismatching paths):\n" + "\n".join(listed))


class ShapeMismatchError(ValueError):
  """The checkpoint is intact but was written for different shapes (a config change)."""


def _restore_args(abstract):
  return ocp.checkpoint_utils.construct_restore_args(abstract)


class Checkpointer:
  """CheckpointManager for {state, data, meta} items with keep-N and async saves."""

  def __init__(self, directory, keep=2, async_save=True, config=None):
    self.directory = os.path.abspath(directory)
    self._meta = {"rvlm_version": _rvlm_version(), "config": _config_json(config)}
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def all_steps(self):
    """Committed steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self):
    """Newest committed step or None (it may still turn out corrupt on restore)."""
    return self._manager.latest_step()

  def save(self, step, state, data_state=None, force=False):
    """Starts an (async) save; returns whether one was started.

    An existing step is never overwritten (e.g. the final step saved twice).
    """
    step = int(step)
    if step in self._manager.all_steps():
      logging.info("checkpoint: step %d already saved in %s; skipping", step, self.directory)
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(_all_processes(_encode_data_state(data_state))),
        meta=ocp.args.JsonSave(dict(self._meta, step=step)))
    return self._manager.save(step, args=args, force=force)

  def wait(self):
    """Blocks until pending async saves are committed."""
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager; call before exit."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def meta(self, step):
    """The 'meta' item of `step`: {'rvlm_version', 'config', 'step'}."""
    return self._manager.restore(int(step), args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def _restore_step(self, step, abstract_state):
    try:
      saved_tree = self._manager.item_metadata(step)["state"].tree
    except Exception as e:  # unreadable metadata: a broken checkpoint, not a mismatch
      raise RuntimeError(f"cannot read metadata: {e!r}") from e
    try:
      check_shapes(saved_tree, abstract_state, f"checkpoint {self.directory}/{step}")
    except ValueError as e:
      raise ShapeMismatchError(str(e)) from None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return restored["state"], _decode_data_state(restored["data"])

  def restore(self, abstract_state, step=None):
    """Returns (state, data_state, step) from `step`, or the newest good step.

    `abstract_state` is the unboxed state of `jax.ShapeDtypeStruct`s with `.sharding`
    (rvlm.sharding.abstract_state_and_shardings); arrays come back in those shardings.
    Raises ValueError (naming paths and shapes) if the checkpoint was written for other
    shapes, FileNotFoundError if there is no checkpoint, RuntimeError if none restores.
    """
    self.wait()  # a save still in flight would look uncommitted
    if step is not None:
      state, data_state = self._restore_step(int(step), abstract_state)
      return state, data_state, int(step)
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
    broken = []
    for s in steps:
      try:
        state, data_state = self._restore_step(s, abstract_state)
      except ShapeMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %s/%d is unreadable (%r); trying the previous one",
                        self.directory, s, e)
        broken.append((s, e))
        continue
      self._set_aside([b for b, _ in broken])
      return state, data_state, s
    raise RuntimeError(f"no checkpoint in {self.directory} restores: " +
                       "; ".join(f"step {s}: {e!r}" for s, e in broken))

  def _set_aside(self, steps):
    """Renames broken steps newer than the restored one, so they can be saved again."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, f"corrupt_step_{step}")
        n = 0
        while os.path.exists(dst):
          n += 1
          dst = os.path.join(self.directory, f"corrupt_step_{step}.{n}")
        os.rename(src, dst)
        logging.warning("checkpoint: moved unreadable %s to %s", src, dst)
    if jax.process_count() > 1:  # others must not list the steps before the rename
      ocp.multihost.sync_global_processes("rvlm_checkpoint_set_aside")
    self._manager.reload()


def _resolve_step_dir(path):
  """A step directory from a step dir, a checkpoint dir, or a workdir.

  For a checkpoint dir / workdir, the newest committed step is used.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.init_from: checkpoint path {path} does not exist")
  if os.path.isdir(os.path.join(path, "state")):
    return path
  ckpt_dir = path
  if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)):
    ckpt_dir = os.path.join(path, CHECKPOINT_SUBDIR)
  steps = ocp.utils.checkpoint_steps(ckpt_dir)
  if not steps:
    raise FileNotFoundError(
        f"config.init_from: no committed checkpoint under {path} (looked in {ckpt_dir})")
  return os.path.join(ckpt_dir, str(max(steps)))


def load_params(path, abstract_params, fresh_params=None, allow_new=()):
  """Params only (no optimizer state, step or data) from another run's checkpoint.

  `path` is a workdir, its checkpoint directory or one step directory.
  `abstract_params` is an unboxed tree of ShapeDtypeStructs (with `.sharding` to get
  sharded arrays). Shapes must match exactly; mismatches are listed by path.

  `allow_new`: regexes of param paths ('recursion/step/connector/...') the model may
  have and the checkpoint lack, e.g. a Recursive Connector added to a trained standard
  model. Those keep their value in `fresh_params` (the freshly initialised tree);
  every other mismatch still raises.
  """
  step_dir = _resolve_step_dir(path)
  state_dir = os.path.join(step_dir, "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    saved = ckptr.metadata(state_dir).item_metadata.tree
    if "params" not in saved:
      raise ValueError(f"config.init_from: {state_dir} holds no 'params' "
                       f"(top-level keys: {sorted(saved)})")
    flat_want = traverse_util.flatten_dict(abstract_params, sep="/")
    saved_paths = set(_shapes_by_path(saved["params"]))
    new = sorted(p for p in flat_want
                 if p not in saved_paths and any(re.fullmatch(rx, p) for rx in allow_new))
    if new and fresh_params is None:
      raise ValueError("load_params: allow_new needs fresh_params for " + ", ".join(new))
    target = {"params": traverse_util.unflatten_dict(
        {p: v for p, v in flat_want.items() if p not in new}, sep="/")}
    check_shapes({"params": saved["params"]}, target, f"config.init_from: {step_dir}")
    restored = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=_restore_args(target), partial_restore=True))
  if not new:
    logging.info("Loaded params from %s", step_dir)
    return restored["params"]
  logging.info("Loaded params from %s; freshly initialised (not in the checkpoint): %s",
               step_dir, ", ".join(new))
  flat = traverse_util.flatten_dict(fresh_params, sep="/")
  flat.update(traverse_util.flatten_dict(restored["params"], sep="/"))
  return traverse_util.unflatten_dict(flat, sep="/")
