"""Symbolic chain-end chasing: the reasoning half of the `chase` family without pixels.

  python -m rvlm.experiments.symbolic_chase --model=rvlm --depth=1 --loops=4
  python -m rvlm.experiments.symbolic_chase --model=standard --depth=1
  python -m rvlm.experiments.symbolic_chase --out=/tmp/chase.jsonl \
      --models=standard,standard_deep,vanilla,rvlm,rvlm_base_none --seeds=0,1,2

A minutes-per-run test-bed for recipes that make recursion steps carry state, before
spending VLM runs on them (docs/depth.md, "Symbolic runs"). It keeps what makes
rvlm/data/chase.py depth-demanding and drops perception:

  * N cells, each one token E_id[id] + E_ptr[successor id]; no positions, so token
    order says nothing;
  * C chains of exactly h hops end at fixed points (the end points to itself), so
    running more steps than h keeps the answer; the other cells form 1-hop pairs, so
    every end has a predecessor and "a fixed point with a predecessor" scores 1/#ends;
  * a query token E_start[start]; the answer is the id at the end of start's chain,
    uniform over ids by symmetry.

Models share one block of `depth` pre-LN layers: `standard` (once), `standard_deep`
(depth x loops distinct layers), `vanilla` (final hidden state fed back, final-step
loss), `rvlm` (E_0 + alpha * W LN(h): the Recursive Connector with one sampled layer,
W zero-initialised, alpha learnable; Monotonic Recursion Loss) and `rvlm_base_none`
(the same without E_0). The hop curriculum matches rvlm/data/curriculum.py: the
maximum h starts at 1 and rises when accuracy at it (final step, 256 fresh examples)
reaches `threshold`, with `focus` of each batch at the maximum.

One run prints one JSON line: test accuracy for h = 1..12 (512 chains each) at every
depth 1..loops and at 2 x loops, h90 and the curriculum's level-up steps. With --out,
every (model, seed) of --models x --seeds is run and appended to that JSONL file
(rerunning skips the ones already there, so two processes with disjoint --models can
share a file), then the table of all runs in the file is printed (mean and std over
seeds at each model's trained depth).
"""
import json
import os
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rvlm import losses

MODELS = ("standard", "standard_deep", "vanilla", "rvlm", "rvlm_base_none")
MAX_TEST_HOPS = 12


def _successor_slots(h: int, n: int, chains: int) -> np.ndarray:
  """Slot -> slot it points to, for slots in chain order (chain 0 first)."""
  c = max(1, min(chains, n // (h + 1)))
  nxt = np.arange(n)
  for k in range(c):
    nxt[k * (h + 1):k * (h + 1) + h] += 1
  for pos in range(c * (h + 1), n - 1, 2):
    nxt[pos] = pos + 1                                  # pairs; a lone last cell is a loop
  return nxt


def _examples_at(rng, b: int, h: int, n: int, chains: int) -> dict:
  ids = np.argsort(rng.random((b, n)), 1)               # slot -> id, a random permutation
  succ = ids[:, _successor_slots(h, n, chains)]
  order = np.argsort(rng.random((b, n)), 1)             # token order, random
  return dict(cid=np.take_along_axis(ids, order, 1).astype(np.int32),
              cptr=np.take_along_axis(succ, order, 1).astype(np.int32),
              start=ids[:, 0].astype(np.int32), answer=ids[:, h].astype(np.int32),
              hops=np.full(b, h, np.int32))


def make_batch(rng, b: int, max_hops: int, n: int, chains: int, min_hops: int = 1,
               focus: float = 0.0) -> dict:
  """b examples with h in min_hops..max_hops, a share `focus` at max_hops."""
  if not 1 <= min_hops <= max_hops or max_hops + 1 > n:
    raise ValueError(f"hops {min_hops}..{max_hops} do not fit {n} cells")
  hops = np.where(rng.random(b) < focus, max_hops, rng.integers(min_hops, max_hops + 1, b))
  parts = [_examples_at(rng, int((hops == h).sum()), h, n, chains)
           for h in range(min_hops, max_hops + 1) if (hops == h).any()]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def follow(ex: dict, i: int) -> int:
  """Example i's answer by following pointers (the reference for tests)."""
  succ = dict(zip(ex["cid"][i].tolist(), ex["cptr"][i].tolist()))
  node = int(ex["start"][i])
  while succ[node] != node:
    node = succ[node]
  return node


class Block(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=self.width)(y, y)
    y = nn.LayerNorm()(x)
    return x + nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(y)))


class ChaseModel(nn.Module):
  """Returns logits over ids after every step, [loops, B, N]; one param tree for any loops."""
  n: int
  width: int
  depth: int
  loops: int
  transition: str          # none (standard) | vanilla | connector | connector_no_base
  alpha_init: float = 0.1

  @nn.compact
  def __call__(self, ex, loops=None):
    embed = lambda name: nn.Embed(self.n, self.width, name=name)
    cells = embed("id")(ex["cid"]) + embed("ptr")(ex["cptr"])
    e0 = jnp.concatenate([cells, embed("start")(ex["start"])[:, None]], 1)
    blocks = [Block(self.width, name=f"block_{i}") for i in range(self.depth)]
    norm, head = nn.LayerNorm(name="final_norm"), nn.Dense(self.n, name="head")
    uses_connector = self.transition.startswith("connector")
    if uses_connector:  # only the connector models own its params
      project = nn.Dense(self.width, kernel_init=nn.initializers.zeros, name="connector")
      project_norm = nn.LayerNorm(name="connector_norm")
      alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (self.width,))
    x, logits = e0, []
    for _ in range(loops or self.loops):
      h = x
      for block in blocks:
        h = block(h)
      logits.append(head(norm(h[:, -1])))
      if self.transition == "vanilla":
        x = h
      elif uses_connector:
        fed_back = alpha * project(project_norm(h))
        x = fed_back if self.transition == "connector_no_base" else e0 + fed_back
    return jnp.stack(logits)


def build_model(name: str, n: int, width: int, depth: int, loops: int, alpha_init: float):
  if name not in MODELS:
    raise ValueError(f"--model={name!r} is unknown; choose one of {MODELS}")
  if name.startswith("standard"):
    return ChaseModel(n, width, depth * (loops if name == "standard_deep" else 1), 1,
                      "none", alpha_init)
  transition = {"vanilla": "vanilla", "rvlm": "connector",
                "rvlm_base_none": "connector_no_base"}[name]
  return ChaseModel(n, width, depth, loops, transition, alpha_init)


def train_and_evaluate(model_name="rvlm", depth=1, loops=4, width=64, cells=32, chains=3,
                       max_hops=8, steps=2000, batch=64, lr=1e-3, beta=2.0, alpha_init=0.1,
                       threshold=0.9, every=100, focus=0.5, seed=0, test_examples=512,
                       log=print):
  model = build_model(model_name, cells, width, depth, loops, alpha_init)
  rng = np.random.default_rng(seed)
  sample = jax.tree.map(jnp.asarray, make_batch(rng, 2, 1, cells, chains))
  params = model.init(jax.random.PRNGKey(seed), sample)
  schedule = optax.warmup_cosine_decay_schedule(0, lr, min(100, steps // 10), steps, lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
  opt_state = tx.init(params)
  final_only = model_name == "vanilla"

  def loss_fn(p, ex):
    # rvlm's own loss: the Monotonic Recursion Loss over steps (vanilla: final step only)
    token_losses, _ = losses.token_cross_entropy(model.apply(p, ex), ex["answer"][None])
    total, _ = losses.recursion_loss(token_losses, jnp.ones_like(ex["answer"]), beta=beta,
                                     kind="final_only" if final_only else "monotonic")
    return total

  @jax.jit
  def train_step(params, opt_state, ex):
    loss, grads = jax.value_and_grad(loss_fn)(params, ex)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, ex):                             # [model.loops]
    return (model.apply(params, ex).argmax(-1) == ex["answer"][None]).mean(-1)

  @jax.jit
  def accuracy_2x(params, ex):
    return (model.apply(params, ex, loops=2 * model.loops).argmax(-1) == ex["answer"][None]).mean(-1)

  level, level_ups, t0 = 1, [], time.time()
  for step in range(1, steps + 1):
    ex = jax.tree.map(jnp.asarray, make_batch(rng, batch, level, cells, chains, focus=focus))
    params, opt_state, loss = train_step(params, opt_state, ex)
    if step % every == 0 and level < max_hops:
      probe = make_batch(np.random.default_rng(step), 256, level, cells, chains, min_hops=level)
      if float(accuracy(params, jax.tree.map(jnp.asarray, probe))[-1]) >= threshold:
        level += 1
        level_ups.append(step)
    if step % 500 == 0:
      log(f"step {step} loss {float(loss):.3f} level {level} {time.time() - t0:.0f}s")

  test_rng = np.random.default_rng(1234)
  by_depth, at_2x = {}, {}
  for h in range(1, min(MAX_TEST_HOPS, cells - 1) + 1):
    ex = jax.tree.map(jnp.asarray, make_batch(test_rng, test_examples, h, cells, chains, min_hops=h))
    by_depth[h] = [round(float(a), 3) for a in accuracy(params, ex)]
    if model.loops > 1:
      at_2x[h] = round(float(accuracy_2x(params, ex)[-1]), 3)
  h90 = 0
  while h90 + 1 in by_depth and by_depth[h90 + 1][-1] >= 0.9:
    h90 += 1
  uses_connector = model.transition.startswith("connector")
  return dict(model=model_name, depth=depth, loops=loops, layers=model.depth,
              trained_depth=model.loops, steps=steps, seed=seed,
              params=int(sum(x.size for x in jax.tree.leaves(params))),
              seconds=round(time.time() - t0), level_ups=level_ups, final_level=level,
              h90=h90, accuracy_by_hops_and_depth=by_depth, accuracy_at_2x_loops=at_2x or None,
              connector_alpha_mean_abs=(round(float(jnp.abs(params["params"]["alpha"]).mean()), 4)
                                        if uses_connector else None))


def table(results, hops=range(1, 9)) -> str:
  """Markdown: per (model, layers, R, steps), accuracy by h at the trained depth, mean (std) over seeds."""
  groups = {}
  for r in results:
    groups.setdefault((r["model"], r["layers"], r["trained_depth"], r["steps"]), []).append(r)
  head = "| model | layers | R | steps | seeds | h90 | " + " | ".join(f"h={h}" for h in hops) + " |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for (model, layers, trained_depth, steps), runs in sorted(groups.items()):
    def cell(values):
      return f"{np.mean(values):.2f} ({np.std(values, ddof=1) if len(values) > 1 else 0:.2f})"
    accs = [cell([r["accuracy_by_hops_and_depth"][str(h)][-1] for r in runs]) for h in hops]
    lines.append(f"| {model} | {layers} | {trained_depth} | {steps} | {len(runs)} | "
                 f"{cell([r['h90'] for r in runs])} | " + " | ".join(accs) + " |")
  return "\n".join(lines)


def run_study(out: str, models, seeds, setting: dict, run) -> str:
  """Runs every (model, seed) not yet in the JSONL file `out` for this `setting` (the
  result fields depth, loops, steps) with run(model, seed), appending each result;
  returns the table of all runs in the file."""
  for model in models:
    if model not in MODELS:
      raise ValueError(f"model {model!r} is unknown; choose from {MODELS}")

  def read():
    if not os.path.exists(out):
      return []
    with open(out) as f:
      return [json.loads(line) for line in f if line.strip()]

  for model in models:
    for seed in seeds:
      if any(r["model"] == model and r["seed"] == seed and
             all(r[k] == v for k, v in setting.items()) for r in read()):
        continue
      with open(out, "a") as f:
        f.write(json.dumps(run(model, seed)) + "\n")
  return table(read())


def define_flags():
  """Flags for the command line only: defined under __main__, so that importing this
  module (tests, tools) never collides with other rvlm entry points' flags."""
  flags.DEFINE_enum("model", "rvlm", MODELS, "Which model (see the module docstring).")
  flags.DEFINE_integer("depth", 1, "D: layers in the shared block.")
  flags.DEFINE_integer("loops", 4, "R: recursion steps (standard_deep: D x R layers).")
  flags.DEFINE_integer("width", 64, "Model width.")
  flags.DEFINE_integer("cells", 32, "N: cells (tokens) per example.")
  flags.DEFINE_integer("chains", 3, "Chains of exactly h hops per example (as many as fit).")
  flags.DEFINE_integer("max_hops", 8, "The curriculum's top level.")
  flags.DEFINE_integer("steps", 2000, "Training steps.")
  flags.DEFINE_integer("batch", 64, "Batch size.")
  flags.DEFINE_float("lr", 1e-3, "Peak learning rate (AdamW, warmup + cosine).")
  flags.DEFINE_float("beta", 2.0, "Monotonic Recursion Loss beta.")
  flags.DEFINE_float("alpha_init", 0.1, "Connector residual scale at init.")
  flags.DEFINE_integer("seed", 0, "Seed for params and data.")
  flags.DEFINE_string("out", None, "JSONL file: run --models x --seeds into it, then print the table.")
  flags.DEFINE_list("models", None, "With --out: the models to run (default: --model).")
  flags.DEFINE_list("seeds", None, "With --out: the seeds to run (default: --seed).")


def main(argv):
  del argv
  f = flags.FLAGS

  def run(model, seed):
    return train_and_evaluate(
        model, f.depth, f.loops, f.width, f.cells, f.chains, f.max_hops, f.steps, f.batch,
        f.lr, f.beta, f.alpha_init, seed=seed,
        log=lambda s: print(f"{model} seed {seed}: {s}", flush=True))

  if f.out is None:
    print(json.dumps(run(f.model, f.seed)))
    return
  try:
    print(run_study(f.out, f.models or [f.model], [int(s) for s in f.seeds or [f.seed]],
                    dict(depth=f.depth, loops=f.loops, steps=f.steps), run))
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  define_flags()
  app.run(main)
