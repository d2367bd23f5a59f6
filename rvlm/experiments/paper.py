"""The paper-claims study: every variant of configs/experiments/paper.py, several seeds.

  python -m rvlm.experiments.paper --out=/tmp/rvlm_paper               # full, 3 seeds
  python -m rvlm.experiments.paper --out=/tmp/rvlm_paper_quick --quick # smoke, < 15 min

Writes OUT/results.json (per variant: accuracy by depth, family and hop count on val
and test as mean / std / values over seeds, the paper's Fig. 1 diagnostics, wall time,
FLOPs per example), OUT/results.md (the tables), OUT/accuracy_by_depth.png and
OUT/fig1_norm_cka.png. Each run lives in OUT/runs/<variant>/seed_<s>/ and is an
ordinary rvlm workdir; rerunning the command skips finished runs and resumes the rest.
"""
import functools
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from flax import linen as nn

# configs/ sits beside the package and is not installed: importable from any cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.experiments import paper as paper_configs  # noqa: E402
from rvlm import flops  # noqa: E402
from rvlm import metrics  # noqa: E402
from rvlm import optim  # noqa: E402
from rvlm import steps  # noqa: E402
from rvlm import sweep  # noqa: E402
from rvlm import train  # noqa: E402
from rvlm.experiments import report  # noqa: E402
from rvlm.models import vlm  # noqa: E402
from rvlm.utils import machine  # noqa: E402

QUICK_STEPS, QUICK_EVAL = 30, 256


def variant_config(variant, *, steps_n, preset, seed, out, overrides=()):
  c = paper_configs.get_config(f"variant={variant},steps={steps_n},preset={preset}")
  c.seed = seed
  for field, value in overrides:
    paper_configs.set_field(c, field, value)
  stage1 = paper_configs.VARIANTS[variant].init_from
  if stage1:
    c.init_from = run_dir(out, stage1, seed)
  return c


def run_dir(out, variant, seed):
  return os.path.join(out, "runs", variant, f"seed_{seed}")


def ordered(variants):
  """Variants with every stage-1 dependency first (added if not requested)."""
  order = []
  for v in variants:
    if v not in paper_configs.VARIANTS:
      raise ValueError(f"--variants: unknown variant {v!r}; known: "
                       f"{sorted(paper_configs.VARIANTS)}")
    dep = paper_configs.VARIANTS[v].init_from
    for name in ([dep] if dep else []) + [v]:
      if name not in order:
        order.append(name)
  return order


def model_costs(config):
  """Parameter count, matmul FLOPs of one training example (forward + backward, as
  trained) and of answering at each depth r (one forward pass over the sequence)."""
  model = vlm.make_model(config.model)
  tx, lr = optim.make_optimizer(config.optim, config.train.total_steps)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       train.dummy_batch(config, 1))
  state = nn.unbox(jax.eval_shape(functools.partial(
      train.init_train_state, model=model, tx=tx, config=config), jax.random.PRNGKey(0)))
  step = functools.partial(steps.train_step, model=model, tx=tx, lr_schedule=lr,
                           loss_cfg=config.loss)
  train_flops = flops.count_flops(step, state, batch)
  infer = {}
  for r in range(1, config.model.recursion.num_steps + 1):
    fwd = lambda p, b, r=r: model.apply({"params": p}, b, num_steps=r)  # noqa: E731
    infer[str(r)] = flops.count_flops(fwd, state["params"], batch)
  params = sum(x.size for x in jax.tree.leaves(state["params"]))
  return {"param_count": int(params), "train_flops_per_example": train_flops,
          "inference_flops_per_example_by_depth": infer}


def run_study(out, *, variants, seeds, steps_n, preset="small", overrides=()):
  """Trains every (variant, seed) not yet finished; writes and returns the summary."""
  os.makedirs(out, exist_ok=True)
  variants = ordered(variants)
  start = time.time()
  # Seed-major: one full replicate finishes before the next starts.
  runs = [sweep.Run(f"{v}/seed_{seed}",
                    variant_config(v, steps_n=steps_n, preset=preset, seed=seed, out=out,
                                   overrides=overrides),
                    run_dir(out, v, seed))
          for seed in range(seeds) for v in variants]
  by_name = sweep.run_all(runs)
  records = {(v, seed): by_name[f"{v}/seed_{seed}"] for seed in range(seeds) for v in variants}
  summary = {"study": {
      "steps_n": steps_n, "seeds": seeds, "preset": preset,
      "overrides": [f"{k}={v!r}" for k, v in overrides],
      "wall_time_s_this_invocation": time.time() - start,
      # Sum over runs of the invocation that trained each (excludes aggregation).
      "wall_time_s_all_runs": sum(r["info"]["wall_time_s"] for r in records.values()),
      "machine": machine.describe(), "std": "sample std over seeds (ddof=1; 0 for one seed)"}}
  seed0 = {run.name: run.config for run in runs}
  for v in variants:
    config = seed0[f"{v}/seed_0"]  # costs do not depend on the seed
    costs = model_costs(config)
    spec = paper_configs.VARIANTS[v]
    summary[v] = {
        "about": spec.about, "mode": spec.mode, "init_from": spec.init_from,
        "overrides": [f"{k}={val!r}" for k, val in spec.overrides],
        "recursion_steps": int(config.model.recursion.num_steps),
        "train_steps": int(config.train.total_steps),
        **costs,
        # This variant's own training (a two-stage run's stage 1 is its own entry).
        "train_flops_total": (costs["train_flops_per_example"]
                              * int(config.data.batch_size) * int(config.train.total_steps)),
        **report.aggregate([records[(v, s)] for s in range(seeds)],
                           train_steps=int(config.train.total_steps)),
    }
  summary["claims"] = report.claims(report.study_variants(summary))
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(summary, f, indent=2)
  report.plot_accuracy(summary, os.path.join(out, "accuracy_by_depth.png"))
  report.plot_norm_cka(summary, os.path.join(out, "fig1_norm_cka.png"))
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(report.tables(summary))
  return summary


def main(argv, *, study=None, tables=None, quick_steps=QUICK_STEPS, quick_eval=QUICK_EVAL):
  """The study's command line; other studies (rvlm/experiments/depth.py) pass their own
  `study` (run_study's signature), `tables` and --quick sizes."""
  study, tables = study or run_study, tables or report.tables
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  metrics.quiet_library_logs()
  steps_n, seeds = f.budget, f.seeds
  overrides = [report.parse_override(s) for s in f.set]
  if f.quick:
    steps_n = steps_n if f["budget"].present else quick_steps
    seeds = seeds if f["seeds"].present else 1
    overrides = [("eval.num_examples", quick_eval)] + overrides
  if steps_n < 1 or seeds < 1:
    raise app.UsageError("--budget and --seeds must be >= 1")
  if not jax.config.jax_compilation_cache_dir:
    # Seeds of a variant compile the same programs: compile each once per study.
    jax.config.update("jax_compilation_cache_dir", os.path.join(f.out, "jax_cache"))
  summary = study(f.out, variants=f.variants, seeds=seeds, steps_n=steps_n,
                  preset=f.preset, overrides=overrides)
  logging.info("study written to %s in %.0f s", f.out,
               summary["study"]["wall_time_s_this_invocation"])
  print(tables(summary))


def define_flags(budget=paper_configs.STEPS, variants=tuple(paper_configs.VARIANTS),
                 preset="small", quick_steps=QUICK_STEPS, quick_eval=QUICK_EVAL):
  """Command-line flags; defined only when run as a program, so that importing this
  module (tests, notebooks) does not clash with other tools' flags. Other studies pass
  their own defaults."""
  flags.DEFINE_string("out", None, "Output directory of the study.")
  flags.DEFINE_integer("seeds", 3, "Seeds per variant (0, 1, ..., seeds - 1).")
  flags.DEFINE_integer("budget", budget,
                       "N: training steps of the one-stage variants (the others scale it).")
  flags.DEFINE_list("variants", list(variants), "Variants to run.")
  flags.DEFINE_string("preset", preset, "Model preset (rvlm/models/presets.py).")
  flags.DEFINE_bool("quick", False, f"Smoke version: N = {quick_steps}, 1 seed, "
                    f"{quick_eval} eval examples.")
  flags.DEFINE_multi_string("set", [], "Extra config override for every run: field=value "
                            "(Python literal), e.g. --set=optim.lr=2e-3.")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["out"])
  app.run(main)
