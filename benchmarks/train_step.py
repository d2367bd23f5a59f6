"""Measures the train step of a config: compile time, step time, examples/s, FLOP/s.

  python benchmarks/train_step.py --config=configs/base.py [--config.model.recursion.num_steps=1]

Runs the trainer's own step (rvlm.train.build_train_step) on synthetic batches of the
config's shapes (no data pipeline), so it isolates the model + optimizer; compare with
benchmarks/data_throughput.py for the input side.
"""
import os
import sys
import time

from absl import app
from absl import flags
import jax
from flax import linen as nn
from ml_collections import config_flags
import numpy as np

from rvlm import sharding as sharding_lib
from rvlm import train
from rvlm.models import vlm

# Config files import `configs.*` (e.g. configs/debug.py builds on configs/base.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

config_flags.DEFINE_config_file("config", "configs/base.py", "Config file.", lock_config=True)
flags.DEFINE_integer("iters", 20, "Timed steps after warm-up.")
FLAGS = flags.FLAGS


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


def main(_):
  config = FLAGS.config
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.mesh)
  b = config.data.batch_size
  # The trainer's own step: same shardings, donation and nan policy as rvlm.main.
  built = train.build_train_step(config, mesh, rules)
  state = sharding_lib.init_sharded(built.init_state, built.state_shardings, mesh, rules,
                                    built.rng)
  fn = built.train_fn
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = sharding_lib.make_global_batch(synthetic_batch(config, b), mesh)
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
    state, m = fn(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(FLAGS.iters):
      state, m = fn(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / FLAGS.iters
  tokens = b * (vlm.num_image_tokens(config.model) + config.data.seq_len)
  print(f"devices={jax.device_count()} R={config.model.recursion.num_steps} "
        f"mode={config.model.recursion.mode} batch={b} tokens/step={tokens}")
  print(f"compile {compile_s:.1f} s | step {dt * 1e3:.1f} ms | {b / dt:.1f} examples/s | "
        f"{tokens / dt:.0f} tokens/s | {flops / 1e9:.2f} GFLOP/step (XLA cost analysis) | "
        f"{flops / dt / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
  app.run(main)
