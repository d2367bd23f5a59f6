"""Per-token decode latency at each recursion depth: the KV-cached decoder against full
recomputation.

  python benchmarks/decode_latency.py --config=configs/base.py [--max_depth=6] [--workdir=W]

At depth r every new token runs the shared decoder stack r times, so the cached
decoder's time per token should grow about linearly in r (ratio to depth 1 about r).
The cached time per token is (T(1 + n) - T(1)) / n, T(m) one generate call making m
tokens: the first token's call (image encoding and the prompt's prefill at every step)
is a fixed cost per answer, reported on its own as "first token ms".
Without a cache every new token reruns the whole model (image encoder included) over
the prompt and the tokens so far; here that sequence is padded to its final length
(input_mask hides the rest), so one compile serves every length and each token costs
one full-length forward. Params are random (or --workdir's), prompts are the first
--batch_size examples of the config's val split, and eos is never accepted, so every
run generates exactly --new_tokens tokens. Both paths decode greedily, and the last
column says how many tokens they agree on (a check on the cache, which should be all
of them up to float rounding near ties).
"""
import functools
import os
import sys
import time

from absl import app
from absl import flags
from flax import linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

# Config files import `configs.*` (e.g. configs/debug.py builds on configs/base.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rvlm import data as data_lib  # noqa: E402
from rvlm import decode  # noqa: E402
from rvlm import generation_eval  # noqa: E402
from rvlm import generation_report  # noqa: E402
from rvlm import train  # noqa: E402
from rvlm.models import vlm  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/base.py", "Config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Load this trained workdir (its config and params) "
                    "instead of random params from --config.")
flags.DEFINE_integer("max_depth", 0, "Measure depths 1..max_depth (0: the trained R; "
                     "up to 2R shows test-time extrapolation).")
flags.DEFINE_integer("batch_size", 1, "Sequences decoded together.")
flags.DEFINE_integer("new_tokens", 32, "Tokens generated per timed run.")
flags.DEFINE_integer("repeats", 10, "Timed runs per setting (the median is reported).")
FLAGS = flags.FLAGS


def recompute_next(params, tokens, input_mask, mask_ar, last, col, image, image_mask, *,
                   model, depth):
  """One greedy token by a full forward over the whole padded sequence: predicts from
  position `last` (per row), writes the token at column `col` and returns the updated
  (tokens, input_mask, last)."""
  batch = {"image": image, "image_mask": image_mask, "tokens": tokens,
           "input_mask": input_mask, "mask_ar": mask_ar}
  hidden = model.apply({"params": params}, batch, num_steps=depth)["hidden"][-1]
  h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)       # [B, 1, d]
  nxt = jnp.argmax(model.apply({"params": params}, h, method=model.logits)[:, 0], -1)
  tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt.astype(jnp.int32), col, 1)
  input_mask = jax.lax.dynamic_update_index_in_dim(
      input_mask, jnp.ones_like(last), col, 1)
  return tokens, input_mask, jnp.full_like(last, col)


def uncached(step, params, batch, *, new_tokens):
  """Greedy decode by recomputation with `step` (jitted recompute_next); returns the
  [B, new_tokens] generated tokens. The layout is the trainer's (as in
  decode.full_sequence): the right-padded prompt as the prefix, then the generated
  tokens, causal, with the prompt's padding masked in the middle."""
  b, p = batch["tokens"].shape
  pad = lambda x, v: np.pad(x, ((0, 0), (0, new_tokens)), constant_values=v)  # noqa: E731
  tokens = jnp.asarray(pad(batch["tokens"], 0))
  input_mask = jnp.asarray(pad(batch["input_mask"], 0))
  mask_ar = jnp.asarray(pad(np.zeros((b, p), np.int32), 1))
  last = jnp.asarray(batch["input_mask"].sum(1) - 1, jnp.int32)
  for k in range(new_tokens):
    tokens, input_mask, last = step(params, tokens, input_mask, mask_ar, last, p + k,
                                    batch["image"], batch["image_mask"])
  return tokens[:, p:]


def timed(fn, repeats):
  """(median seconds, last output) of `repeats` calls after one untimed warm-up."""
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def main(_):
  if FLAGS.workdir:
    from rvlm import inference  # pylint: disable=g-import-not-at-top
    loaded = inference.load(FLAGS.workdir)
    config, model, params = loaded.config, loaded.model, loaded.params
    source = f"{FLAGS.workdir} (step {loaded.step})"
  else:
    config = FLAGS.config
    model = vlm.make_model(config.model)
    # Jitted: run op by op, init takes tens of seconds on CPU.
    boxed = jax.jit(model.init)(jax.random.PRNGKey(0), train.dummy_batch(config, 1))
    params = nn.unbox(boxed["params"])
    source = "random params"
  r_trained = int(config.model.recursion.num_steps)
  max_depth = 1 if config.model.recursion.mode == "none" else (FLAGS.max_depth or r_trained)
  n, b = FLAGS.new_tokens, FLAGS.batch_size
  tok = data_lib.get_tokenizer(config.data)
  examples = data_lib.build_eval_batches(config, "val", b, b)
  batch = generation_eval.prompt_batch(examples[0], generation_eval.max_prompt_length(examples),
                                       tok.eos_id)
  # An id the argmax over the vocabulary never returns: no row stops early.
  no_eos = int(config.model.vocab_size)
  num_params = sum(x.size for x in jax.tree.leaves(params))

  m = generation_report.machine()
  print(f"machine: {m['processor']}, {m['cpu_count']} cores, {m['backend']} x{len(m['devices'])} "
        f"({m['device_kind']}), jax {m['jax_version']}")
  print(f"config: R={r_trained} mode={config.model.recursion.mode} "
        f"decoder depth={config.model.decoder.depth} width={config.model.decoder.width} "
        f"params={num_params / 1e6:.2f}M ({source}) | "
        f"image tokens={vlm.num_image_tokens(config.model)} "
        f"prompt={batch['tokens'].shape[1]} new tokens={n} batch={b} | median of {FLAGS.repeats}")
  print(f"{'depth':>5} {'first token ms':>14} {'cached ms/tok':>13} {'uncached ms/tok':>15} "
        f"{'cached/r1':>9} {'uncached/r1':>11} {'cache speedup':>13} {'same tokens':>11}")
  base = None
  for r in range(1, max_depth + 1):
    first_s, _ = timed(lambda: decode.generate(  # pylint: disable=cell-var-from-loop
        model, params, batch, depth=r, max_new_tokens=1, eos_id=no_eos), FLAGS.repeats)
    cached_s, gen = timed(lambda: decode.generate(  # pylint: disable=cell-var-from-loop
        model, params, batch, depth=r, max_new_tokens=1 + n, eos_id=no_eos), FLAGS.repeats)
    step = jax.jit(functools.partial(recompute_next, model=model, depth=r))
    full_s, ref = timed(
        lambda: uncached(step, params, batch, new_tokens=n),  # pylint: disable=cell-var-from-loop
        FLAGS.repeats)
    c, u = 1e3 * (cached_s - first_s) / n, 1e3 * full_s / n
    base = base or (c, u)
    same = int((np.asarray(gen.tokens[:, :n]) == np.asarray(ref)).sum())
    print(f"{r:>5} {1e3 * first_s:>14.2f} {c:>13.2f} {u:>15.2f} {c / base[0]:>9.2f} "
          f"{u / base[1]:>11.2f} {u / c:>12.1f}x {same:>5}/{b * n}")


if __name__ == "__main__":
  app.run(main)
