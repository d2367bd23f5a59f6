"""Measures the train step of a config: compile time, step time, examples/s, FLOP/s.

  python benchmarks/train_step.py --config=configs/base.py [--config.model.recursion.num_steps=1]

Runs the trainer's own step (rvlm.train.build_train_step: same shardings, donation and
nan policy as rvlm.main) on synthetic batches of the config's shapes (no data
pipeline), so it isolates the model + optimizer; benchmarks/data_throughput.py measures
the input side. FLOPs are rvlm/flops.py's count (every scan iteration counted: forward,
backward and any remat recomputation); XLA's cost analysis counts a scan body once.
"""
import copy
import os
import sys
import time

from absl import app
from absl import flags
import jax
from flax import linen as nn
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rvlm import flops as flops_lib  # noqa: E402
from rvlm import sharding as sharding_lib  # noqa: E402
from rvlm import train  # noqa: E402
from rvlm.models import vlm  # noqa: E402


def synthetic_batch(config, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  s, t = config.model.vit.image_size, config.data.seq_len
  mask_ar = np.zeros((batch_size, t), np.int32)
  mask_ar[:, t // 2:] = 1
  return {"image": rng.uniform(-1, 1, (batch_size, s, s, 3)).astype(np.float32),
          "image_mask": np.ones((batch_size,), np.int32),
          "tokens": rng.integers(1, config.model.vocab_size, (batch_size, t)).astype(np.int32),
          "input_mask": np.ones((batch_size, t), np.int32), "mask_ar": mask_ar,
          "mask_loss": mask_ar.copy(), "family": np.zeros((batch_size,), np.int32),
          "hops": np.zeros((batch_size,), np.int32)}


def measure(config, iters=10, run=True):
  """Compiles (and, with `run`, times) the trainer's step on a synthetic batch.

  Returns {compile_s, flops, executed_flops, params, tokens (per step), memory (the
  compiled step's memory analysis, bytes: temp = activations and workspace, argument,
  output)} and with `run` also {step_s (median of `iters`), examples_per_s,
  tokens_per_s, gflops_per_s (of `flops`)}. Both FLOP counts are rvlm/flops.py's, per
  step: `executed_flops` includes what remat recomputes, `flops` is the same step
  without remat, the model's own work, so MFU (flops / time / peak) does not reward
  recomputation.
  """
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.mesh)
  b = config.data.batch_size
  built = train.build_train_step(config, mesh, rules)
  fn = built.train_fn
  plain_fn = None   # the same step without remat, for the model's own FLOPs
  if config.model.remat_policy != "none" or config.model.recursion.remat:
    plain = copy.deepcopy(config)
    plain.model.remat_policy, plain.model.recursion.remat = "none", False
    plain_fn = train.build_train_step(plain, mesh, rules).train_fn
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = sharding_lib.make_global_batch(synthetic_batch(config, b), mesh)
    executed = flops_lib.count_flops(fn, built.abstract, batch)
    flops = executed if plain_fn is None else flops_lib.count_flops(plain_fn, built.abstract,
                                                                     batch)
    t0 = time.perf_counter()
    compiled = fn.lower(built.abstract, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = dict(compile_s=compile_s, flops=flops, executed_flops=executed, batch=b,
               params=sum(x.size for x in jax.tree.leaves(built.abstract["params"])),
               tokens=b * (vlm.num_image_tokens(config.model) + config.data.seq_len),
               memory=dict(temp=mem.temp_size_in_bytes, argument=mem.argument_size_in_bytes,
                           output=mem.output_size_in_bytes) if mem is not None else None)
    if not run:
      return out
    state = sharding_lib.init_sharded(built.init_state, built.state_shardings, mesh, rules,
                                      built.rng)
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  dt = float(np.median(times))
  return dict(out, step_s=dt, examples_per_s=b / dt, tokens_per_s=out["tokens"] / dt,
              gflops_per_s=flops / dt / 1e9)


def main(_):
  config = FLAGS.config
  r = measure(config, FLAGS.iters)
  print(f"devices={jax.device_count()} R={config.model.recursion.num_steps} "
        f"mode={config.model.recursion.mode} batch={r['batch']} tokens/step={r['tokens']} "
        f"params={r['params'] / 1e6:.2f}M dtype={config.model.dtype}")
  print(f"compile {r['compile_s']:.1f} s | step {r['step_s'] * 1e3:.1f} ms | "
        f"{r['examples_per_s']:.1f} examples/s | {r['tokens_per_s']:.0f} tokens/s | "
        f"{r['flops'] / 1e9:.2f} GFLOP/step (matmuls, rvlm/flops.py; executed with remat "
        f"{r['executed_flops'] / 1e9:.2f}) | "
        f"{r['gflops_per_s']:.1f} GFLOP/s")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/base.py", "Config file.", lock_config=True)
  flags.DEFINE_integer("iters", 20, "Timed steps after warm-up (the median is reported).")
  FLAGS = flags.FLAGS
  app.run(main)
