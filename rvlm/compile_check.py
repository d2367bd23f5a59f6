"""Compiles the trainer's step for a device mesh without running it: per-device bytes
and FLOPs per step, to size a pod slice for the 1B / 3B presets from a laptop.

  python -m rvlm.compile_check --config=configs/base.py:preset=1b --num_devices=8 \\
      --mesh=1,8,1 --config.data.batch_size=16 --config.data.seq_len=256 \\
      [--device_memory_gib=16] [--json=/tmp/compile_1b.json]

--num_devices=N simulates N CPU devices (without it, the real devices of this machine
are used, e.g. a TPU host compiles for its own chips); --mesh=data,fsdp,tensor
overrides config.mesh (one axis may be -1). The step is rvlm.train.build_train_step's,
the one the trainer runs: same model, optimizer, shardings, donation and
config.model.remat_policy / scan_layers. Nothing is initialised or trained: params,
optimizer state and batch are ShapeDtypeStructs carrying their shardings.

Reported per device: the train state's bytes from its shardings (params, optimizer
state, the rest), XLA's memory analysis of the compiled program (arguments, outputs,
donated aliases, temp = activations kept for the backward pass, gradients and
workspace) and FLOPs per step. A simulated mesh compiles with the CPU backend, whose
fusion and buffer assignment differ from a TPU's or GPU's: the state bytes are exact,
temp is an estimate of the same program's activations. Refusals (a mesh that does not
match the devices, a batch the data shards do not divide, an unknown preset, no
positive seq_len) print one line, "rvlm.compile_check: error: ...", and exit with
status 2.
"""
import json
import math
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from flax import linen as nn
from ml_collections import config_flags

from rvlm import flops as flops_lib
from rvlm import metrics
from rvlm import sharding as sharding_lib
from rvlm import train
from rvlm.models import vlm

FLAGS = flags.FLAGS

GIB = 2**30
# CompiledMemoryStats fields reported, by report key; a backend may lack some.
_MEMORY_FIELDS = (("argument", "argument_size_in_bytes"),
                  ("output", "output_size_in_bytes"),
                  ("alias", "alias_size_in_bytes"),
                  ("temp", "temp_size_in_bytes"),
                  ("generated_code", "generated_code_size_in_bytes"))


def simulated_devices(n):
  """`n` CPU devices for the mesh.

  jax_num_cpu_devices (which wins over XLA_FLAGS' xla_force_host_platform_device_count)
  and jax_platforms take effect only before JAX creates its backends, so they are set
  here, after flag parsing and before any JAX operation: no environment edits before
  imports, no re-exec. If backends already exist (this called from a process that
  used JAX, e.g. the tests' 8 simulated devices), the first `n` of them are used.
  """
  if n < 1:
    raise ValueError(f"--num_devices={n} must be >= 1")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # backends already initialised: use what this process has
    available = jax.devices()
    if n > len(available):
      raise ValueError(f"--num_devices={n}: this process already initialised JAX with "
                       f"{len(available)} devices; run compile_check in a fresh process") from None
    return available[:n]
  jax.config.update("jax_platforms", "cpu")
  return jax.devices()


def apply_mesh_flag(config, text):
  """`config` with config.mesh.{data,fsdp,tensor} from 'D,F,T' (--mesh)."""
  parts = text.split(",")
  try:
    sizes = [int(p) for p in parts]
  except ValueError:
    sizes = []
  if len(sizes) != len(sharding_lib.MESH_AXES):
    raise ValueError(f"--mesh={text!r}: expected three integers data,fsdp,tensor")
  config = config.copy_and_resolve_references()
  config.mesh.update(dict(zip(sharding_lib.MESH_AXES, sizes)))
  return config


def abstract_batch(config, batch_size, sharding):
  """ShapeDtypeStructs of one global train batch: the model's contract
  (train.dummy_batch) plus the per-example labels the data pipeline adds."""
  shapes = jax.eval_shape(lambda: train.dummy_batch(config, batch_size))
  shapes.update(family=jax.ShapeDtypeStruct((batch_size,), "int32"),
                hops=jax.ShapeDtypeStruct((batch_size,), "int32"))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      shapes)


def check(config, devices):
  """Raises ValueError naming the field that stops `config` compiling on `devices`;
  returns (mesh, rules)."""
  train.check_config(config)
  if int(config.data.seq_len) <= 0:
    raise ValueError(f"config.data.seq_len={config.data.seq_len}: compile_check needs a "
                     "positive text length (own data settles 0 from the train records); "
                     "pass --config.data.seq_len=N")
  mesh = sharding_lib.make_mesh(config.mesh, devices)
  sharding_lib.check_batch_size(config.data.batch_size, mesh)
  return mesh, sharding_lib.rules_from_config(config.mesh)


def shard_bytes(tree):
  """Bytes one device holds of `tree` (ShapeDtypeStructs with .sharding): the largest
  per-device total, which is every device's for the even shardings jit accepts."""
  per_device = {}
  for x in jax.tree.leaves(tree):
    shard = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for d in x.sharding.device_set:
      per_device[d] = per_device.get(d, 0) + shard
  return max(per_device.values(), default=0)


def total_bytes(tree):
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def memory_stats(compiled):
  """Per-device bytes from XLA's memory analysis; None where the backend has none."""
  stats = compiled.memory_analysis()
  out = {key: (None if stats is None else getattr(stats, attr, None))
         for key, attr in _MEMORY_FIELDS}
  parts = [out[k] for k in ("argument", "output", "alias", "temp", "generated_code")]
  # Live at once: inputs, outputs not written into donated inputs, and the program's
  # temporaries. (XLA's own peak_memory_in_bytes is left out: on CPU it comes out
  # below temp alone, so it is not the figure a device must hold.)
  out["total"] = (None if any(p is None for p in parts)
                  else parts[0] + parts[1] - parts[2] + parts[3] + parts[4])
  return out


def xla_flops(compiled):
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return None if flops is None or flops < 0 else float(flops)


def _compiler_options(platform):
  """The CPU program is never run, so LLVM need not optimise its machine code: level 0
  compiles the 1b / 3b steps about 2-3x faster with the same buffer assignment, memory
  analysis and cost analysis (those come from the HLO passes, which are unchanged).
  Other backends compile as the trainer would."""
  return {"xla_backend_optimization_level": 0} if platform == "cpu" else None


def compile_check(config, devices):
  """Lowers and compiles the train step of `config` on a mesh of `devices`; returns the
  report dict (bytes per device, FLOPs, timings). Raises ValueError before any tracing
  when the config does not fit the devices (see `check`)."""
  mesh, rules = check(config, devices)
  built = train.build_train_step(config, mesh, rules)
  batch_size, seq_len = int(config.data.batch_size), int(config.data.seq_len)
  batch = abstract_batch(config, batch_size, built.batch_sharding)
  state = built.abstract

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    t0 = time.perf_counter()
    traced = built.train_fn.trace(state, batch)
    lowered = traced.lower()
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile(_compiler_options(devices[0].platform))
    compile_s = time.perf_counter() - t0

  n = len(devices)
  other = {k: v for k, v in state.items() if k not in ("params", "opt_state")}
  matmul = flops_lib.jaxpr_flops(traced.jaxpr.jaxpr)
  return {
      "mesh": dict(mesh.shape),
      "num_devices": n,
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "batch_size": batch_size,
      "batch_per_data_shard": batch_size // sharding_lib.num_data_shards(mesh),
      "seq_len": seq_len,
      "image_tokens": vlm.num_image_tokens(config.model),
      "recursion_steps": int(config.model.recursion.num_steps),
      "remat_policy": str(config.model.remat_policy),
      "scan_layers": bool(config.model.scan_layers),
      "grad_accum_steps": int(config.train.grad_accum_steps),
      "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
      "lower_s": lower_s,
      "compile_s": compile_s,
      "state_bytes_total": {"params": total_bytes(state["params"]),
                            "opt_state": total_bytes(state["opt_state"]),
                            "other": total_bytes(other)},
      "state_bytes_per_device": {"params": shard_bytes(state["params"]),
                                 "opt_state": shard_bytes(state["opt_state"]),
                                 "other": shard_bytes(other)},
      "batch_bytes_per_device": shard_bytes(batch),
      "memory_per_device": memory_stats(compiled),
      # XLA's count is of the partitioned (per-device) program and counts the body of
      # a scan once; the jaxpr count multiplies scans by their length (rvlm.flops).
      "xla_flops_per_device": xla_flops(compiled),
      "matmul_flops_total": matmul,
      "matmul_flops_per_device": matmul / n,
  }


def fits(report, device_memory_gib):
  """(verdict, line) for `device_memory_gib` of memory per device."""
  total = report["memory_per_device"]["total"]
  if total is None:
    return None, (f"fits in {device_memory_gib:g} GiB: n/a (this backend gives no "
                  "memory analysis)")
  limit = device_memory_gib * GIB
  ok = total <= limit
  return ok, (f"fits in {device_memory_gib:g} GiB: {'OK' if ok else 'DOES NOT FIT'} "
              f"({_gib(total)} of {device_memory_gib:g} GiB per device, "
              f"{100 * total / limit:.0f}%)")


def _gib(b):
  if b is None:
    return "n/a"
  if b < 2**20:
    return f"{b} B"
  return f"{b / GIB:.3f} GiB" if b >= GIB / 10 else f"{b / 2**20:.3f} MiB"


def _flops(f):
  if f is None:
    return "n/a"
  return f"{f / 1e12:.3f} TFLOP" if f >= 1e11 else f"{f / 1e9:.3f} GFLOP"


def format_report(r):
  m, s, t = r["memory_per_device"], r["state_bytes_per_device"], r["state_bytes_total"]
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  kind = "" if r["device_kind"] == r["platform"] else f" ({r['device_kind']})"
  lines = [
      f"mesh              {mesh} on {r['num_devices']} {r['platform']} devices{kind}",
      f"batch             {r['batch_size']} global, {r['batch_per_data_shard']} per data "
      f"shard; {r['image_tokens']} image + {r['seq_len']} text tokens",
      f"model             {r['param_count']:,} params; R={r['recursion_steps']}, "
      f"remat_policy={r['remat_policy']}, scan_layers={r['scan_layers']}, "
      f"grad_accum_steps={r['grad_accum_steps']}",
      f"time              trace + lower {r['lower_s']:.1f} s, XLA compile {r['compile_s']:.1f} s",
      "per device, from the shardings:",
      f"  params          {_gib(s['params'])}  (all devices: {_gib(t['params'])})",
      f"  optimizer state {_gib(s['opt_state'])}  (all devices: {_gib(t['opt_state'])})",
      f"  other state     {_gib(s['other'])}",
      f"  batch           {_gib(r['batch_bytes_per_device'])}",
      "per device, XLA memory analysis of the compiled step:",
      f"  arguments       {_gib(m['argument'])}",
      f"  outputs         {_gib(m['output'])}",
      f"  donated alias   {_gib(m['alias'])}",
      f"  temp            {_gib(m['temp'])}  (activations, gradients, workspace)",
      f"  generated code  {_gib(m['generated_code'])}",
      f"  total           {_gib(m['total'])}  (arguments + outputs - alias + temp + code)",
      "FLOPs per step:",
      f"  matmul (jaxpr)  {_flops(r['matmul_flops_total'])} all devices, "
      f"{_flops(r['matmul_flops_per_device'])} per device",
      f"  XLA cost        {_flops(r['xla_flops_per_device'])} per device (counts a scan "
      "body once: low for scanned layers)",
  ]
  return "\n".join(lines)


def define_flags():
  """The CLI's flags, defined only when run as a program: other modules that define
  --config (rvlm.main, rvlm.data.show) may share a process with this one."""
  config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes overriding config.mesh (one "
                      "may be -1).")
  flags.DEFINE_integer("num_devices", None, "Simulate this many CPU devices (default: the "
                       "devices this machine has).")
  flags.DEFINE_float("device_memory_gib", None, "Memory of one device in GiB (e.g. 16 for "
                     "TPU v5e, 95 for v5p, 80 for H100): report whether the step fits.")
  flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
  flags.mark_flags_as_required(["config"])


def _refuse(message):
  print("rvlm.compile_check: error: " + " ".join(str(message).split()), file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    # config_flags wraps an error of the config file (e.g. an unknown preset) with its
    # traceback; the last line is the error itself.
    _refuse(str(e).strip().splitlines()[-1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logs()
  config = FLAGS.config
  try:
    devices = jax.devices() if FLAGS.num_devices is None else simulated_devices(FLAGS.num_devices)
    if FLAGS.mesh is not None:
      config = apply_mesh_flag(config, FLAGS.mesh)
    check(config, devices)
  except ValueError as e:
    hint = f" (--mesh={FLAGS.mesh})" if FLAGS.mesh is not None and "config.mesh" in str(e) else ""
    _refuse(f"{e}{hint}")
  logging.info("compiling the train step for %d %s devices", len(devices), devices[0].platform)
  report = compile_check(config, devices)
  print(format_report(report))
  if FLAGS.device_memory_gib is not None:
    ok, line = fits(report, FLAGS.device_memory_gib)
    report["device_memory_gib"], report["fits"] = FLAGS.device_memory_gib, ok
    print(line)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=_parse_flags)
