"""Device mesh, logical axis rules and train-state shardings.

One code path for 1 CPU, simulated CPU devices and TPU pods:

  mesh = make_mesh(config.mesh)
  rules = rules_from_config(config.mesh)
  abstract, shardings = abstract_state_and_shardings(init_fn, mesh, rules)
  state = init_sharded(init_fn, shardings, mesh, rules)   # created already sharded
  batch = make_global_batch(local_batch, mesh)            # per step

Models annotate kernels with logical names (`nn.with_logical_partitioning`) and
activations with `nn.with_logical_constraint`; `LOGICAL_AXIS_RULES` maps those names to
the mesh axes ('data', 'fsdp', 'tensor') in maxtext style. Rules are ordered: when two
dims of one array ask for the same mesh axis, the earlier rule wins and the later dim
is replicated (flax resolves this), so e.g. an (embed, embed_out) kernel is sharded
only on its input side.
"""
import math

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dim of inputs and activations is split over both data-parallel axes:
# fsdp shards params but still consumes a distinct slice of the batch per device.
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES = (
    # Activations.
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # Kernels. 'vit_embed' precedes 'embed' so the projector (vit_embed, embed) shards
    # its input side, like every other d_in -> d_out kernel.
    ("vit_embed", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vit_mlp", "tensor"),
    ("heads", "tensor"),
    # Few KV heads (GQA) often do not divide the tensor axis; `_fit_to_shape` then
    # replicates that dim instead of failing.
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    # Replicated: small, or (layers) the scan axis that each step slices whole.
    ("head_dim", None),
    ("layers", None),
    ("patch", None),
    ("vit_pos", None),
    ("connector_layers", None),
    ("modality", None),
    ("embed_out", None),
    ("norm", None),
)


def _mesh_shape(mesh_config, num_devices):
  """Resolves the (data, fsdp, tensor) sizes; one of them may be -1 (fill the rest)."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh ({desc}): sizes must be positive or -1")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh ({desc}): at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh ({desc}): the fixed axes ({known} devices) do not "
                       f"divide the device count {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh ({desc}): product {math.prod(sizes)} != device "
                     f"count {num_devices}")
  return tuple(sizes)


def _granules(devices):
  """Groups of devices joined by fast links (ICI): TPU slices, else processes (hosts)."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  if None not in slices and len(slices) > 1:
    return "slices", len(slices)
  # One slice (CPU and GPU devices report slice 0): hosts are the granules.
  return "processes", len({d.process_index for d in devices})


def make_mesh(mesh_config, devices=None):
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices).

  Multi-slice (config.mesh.dcn_data = number of slices > 1): data, fsdp and tensor
  describe one slice, and the 'data' axis is extended across slices, so only the
  data-parallel gradient reduction crosses the slow data-centre network (DCN). The
  mesh axes stay the same three, so the logical rules need no change.
  """
  devices = jax.devices() if devices is None else list(devices)
  dcn = int(mesh_config.get("dcn_data", 1))
  if dcn < 1 or len(devices) % dcn:
    raise ValueError(f"config.mesh.dcn_data={dcn} must be >= 1 and divide the device "
                     f"count {len(devices)}")
  shape = _mesh_shape(mesh_config, len(devices) // dcn)
  # Auto, not the Explicit default: explicit axes break flax logical partitioning.
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  if dcn == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  kind, count = _granules(devices)
  if count != dcn:
    raise ValueError(f"config.mesh.dcn_data={dcn}, but the devices form {count} {kind}: "
                     "set it to the number of slices (or hosts)")
  grid = mesh_utils.create_hybrid_device_mesh(
      shape, (dcn, 1, 1), devices, process_is_granule=kind == "processes")
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def rules_from_config(mesh_config):
  """LOGICAL_AXIS_RULES with `config.mesh.rules` (optional (name, axes) pairs) first.

  An override replaces the default rule for the same logical name.
  """
  overrides = tuple(tuple(r) for r in (mesh_config.get("rules", None) or ()))
  for rule in overrides:
    if len(rule) != 2:
      raise ValueError(f"config.mesh.rules: {rule!r} is not a (logical_name, mesh_axes) pair")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    unknown = [a for a in axes if a is not None and a not in MESH_AXES]
    if unknown:
      raise ValueError(f"config.mesh.rules: {rule!r} names unknown mesh axes {unknown}; "
                       f"known: {MESH_AXES}")
  overridden = {name for name, _ in overrides}
  normalised = tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in overrides)
  return normalised + tuple(r for r in LOGICAL_AXIS_RULES if r[0] not in overridden)


def _axis_size(mesh, axes):
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _fit_to_shape(sharding, shape, path):
  """Drops mesh axes from dims they do not divide (e.g. 2 KV heads on tensor=4).

  jit refuses uneven shardings; replicating such a dim is always correct and only
  costs memory, so the same rules work for every model size and mesh.
  """
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  changed = False
  for d, axes in enumerate(spec):
    if axes is None:
      continue
    kept = axes if isinstance(axes, tuple) else (axes,)
    # Drop trailing axes until the remaining ones divide the dim.
    while kept and shape[d] % _axis_size(sharding.mesh, kept):
      kept = kept[:-1]
    new = None if not kept else (kept if isinstance(axes, tuple) else kept[0])
    if new != axes:
      logging.warning("sharding: %s dim %d (size %d) not divisible by mesh axes %s; "
                      "using %s", path, d, shape[d], axes, new)
      spec[d], changed = new, True
  return NamedSharding(sharding.mesh, P(*spec)) if changed else sharding


def abstract_state_and_shardings(init_fn, mesh, rules, *args):
  """Shapes and NamedShardings of `init_fn(*args)` without computing it.

  `init_fn` returns the train state with `nn.LogicallyPartitioned` boxes (model params
  and an optax state initialised from boxed params, whose moments mirror them). Returns
  `(abstract, shardings)` for the *unboxed* state: ShapeDtypeStructs carrying
  `.sharding` (what checkpoint restore wants) and the matching NamedSharding tree
  (what jit in/out_shardings want). Unannotated leaves are replicated.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(init_fn, *args)
  specs = nn.get_partition_spec(boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  abstract = nn.unbox(boxed)
  paths = jax.tree_util.tree_map_with_path(lambda p, _: jax.tree_util.keystr(p), abstract)
  shardings = jax.tree.map(lambda s, x, p: _fit_to_shape(s, x.shape, p),
                           shardings, abstract, paths)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return abstract, shardings


def init_sharded(init_fn, shardings, mesh, rules, *args):
  """Runs `init_fn(*args)` under jit so each leaf is created directly in its shards."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)


def replicated(mesh):
  """Sharding for scalars and small arrays every device holds in full."""
  return NamedSharding(mesh, P())


def data_sharding(mesh):
  """Batch dim split over ('data', 'fsdp'); other dims whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def num_data_shards(mesh):
  return _axis_size(mesh, BATCH_AXES)


def check_batch_size(batch_size, mesh, field="config.data.batch_size"):
  """The global batch must split evenly over data shards and processes."""
  shards, procs = num_data_shards(mesh), jax.process_count()
  if batch_size % shards or batch_size % procs:
    raise ValueError(f"{field}={batch_size} must be divisible by the number of data "
                     f"shards (data*fsdp={shards}) and of processes ({procs})")


def make_global_batch(local_batch, mesh):
  """Assembles each process's local batch dict into global arrays sharded on batch."""
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(local_batch)}
  if len(sizes) != 1:
    raise ValueError(f"make_global_batch: leaves disagree on the batch size: {sorted(sizes)}")
  check_batch_size(sizes.pop() * jax.process_count(), mesh)
  sharding = data_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
