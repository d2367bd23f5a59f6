"""The depth study: every variant of configs/experiments/depth.py on the chase task.

  python -m rvlm.experiments.depth --out=/tmp/rvlm_depth               # full, 3 seeds
  python -m rvlm.experiments.depth --out=/tmp/rvlm_depth_quick --quick # smoke, < 15 min
  python -m rvlm.experiments.depth --out=/tmp/d --variants=standard,rvlm --budget=500

Built from the paper study's pieces (rvlm/experiments/paper.py: run directories, FLOP
counts, command line; rvlm/sweep.py: resumable runs; report.py: aggregation over
seeds). Each run is an ordinary rvlm workdir OUT/runs/<variant>/seed_<s>/; rerunning
the command skips finished runs and resumes the rest. Writes:

OUT/depth.json: {"study": ..., "claims": ..., <variant>: ...}. Per variant:
  accuracy_by_hops_and_depth  h -> r -> {mean, std, values}: test split, r = 1 .. the
                              deepest depth evaluated (2R for recursive variants)
  trained_depth               R (1 for standard variants)
  h90                         {mean, std, values} over seeds, see h90()
  flops_per_example           {train, inference}: matmul FLOPs of one training example
                              and of one answer at the trained depth (paper.model_costs)
  param_count, train_steps, accuracy_at_trained_depth,
  flips_to_wrong_by_depth     r -> mean_std: share right at r-1 and wrong at r
  fig1                        the paper's Fig. 1 diagnostics by depth (test): input and
                              hidden-state norms, CKA with E_0
  connector_alpha_final, curriculum_final_level (per seed), and report.aggregate's
  fields (splits: every split's aggregates; wall and train time).
  std is the sample std over seeds (ddof = 1; 0 for one seed).
OUT/results.md: the tables. OUT/accuracy_by_hops.png: accuracy against h.

h90 of one seed: the largest h such that every h' = 1..h has test accuracy >= 0.9 at
the trained depth; 0 when h = 1 is below 0.9. A hop count absent from the test sample
ends the run (no evidence is no pass). The study's h90 is its mean over seeds.

The claims (points = 100 x accuracy, test split, each variant at its trained depth),
each with its numbers and `met` (None where the numbers cannot decide it):
  a  rvlm h90 >= 2 x standard h90 (means over seeds), and rvlm h90 > 0.
  b  on the hard trained hop counts, h with standard's mean h90 < h <= max_hops (the
     largest trained h, config.data.embedded.max_hops), accuracy averaged over those
     h (unweighted) per seed: rvlm minus each baseline >= GOALS[baseline] points;
     `exceeds_2_std` says whether the margin is above twice the sample std of the
     per-seed differences (seed s of rvlm minus seed s of the baseline; None with
     one seed).
  c  rvlm test accuracy non-decreasing over r = 1..R, each step losing at most
     MONOTONE_TOL_POINTS (evaluation noise), and at r = R+1..2R at most
     EXTRAPOLATION_TOL_POINTS below its accuracy at R.
  d  on test hop counts above max_hops (never trained), rvlm's accuracy at r = 2R
     minus at r = R, averaged over those h: met when the mean gain is > 0.
A claim whose variants were not run reports status "not run".
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

# configs/ sits beside the package and is not installed: importable from any cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs.experiments import depth as depth_configs  # noqa: E402
from configs.experiments.paper import set_field  # noqa: E402
from rvlm import sweep  # noqa: E402
from rvlm.experiments import paper  # noqa: E402
from rvlm.experiments import report  # noqa: E402
from rvlm.utils import machine  # noqa: E402

QUICK_STEPS, QUICK_EVAL = 40, 256
H90_THRESHOLD = 0.9
# Claim b: rvlm minus each baseline on the hard trained hop counts, in points. The deep
# standard model has R x the parameters: matching it within 5 points is the goal.
GOALS = {"standard": 10.0, "vanilla": 7.0, "standard_iso_flops": 3.0, "standard_deep": -5.0}
MONOTONE_TOL_POINTS = 0.5
EXTRAPOLATION_TOL_POINTS = 1.0
NOT_RUN = "not run"
FIG1_KEYS = ("input_norm_by_depth", "hidden_norm_by_depth", "cka_with_e0_by_depth")


# ---- runs ----------------------------------------------------------------------------


def check_variants(variants):
  unknown = [v for v in variants if v not in depth_configs.VARIANTS]
  if not variants:
    raise ValueError(f"--variants: none given; known: {sorted(depth_configs.VARIANTS)}")
  if unknown:
    raise ValueError(f"--variants: unknown variant {unknown[0]!r}; known: "
                     f"{sorted(depth_configs.VARIANTS)}")
  return list(dict.fromkeys(variants))  # in the given order, once each


def variant_config(variant, *, steps_n, seed, preset="", overrides=()):
  arg = f"variant={variant},steps={steps_n},seed={seed}" + (f",preset={preset}" if preset else "")
  c = depth_configs.get_config(arg)
  for field, value in overrides:
    set_field(c, field, value)
  if "test" not in c.eval.splits:
    raise ValueError(f"config.eval.splits={tuple(c.eval.splits)!r}: the depth study "
                     "reads the test split")
  return c


def curriculum_level(workdir, config):
  """The train stream's last hop-count level (its start if never raised; None when the
  curriculum is off): how far the curriculum got within the budget."""
  cur = config.data.get("curriculum")
  if cur is None or not cur.enabled:
    return None
  levels = [r["curriculum/level"] for r in sweep.read_metrics(workdir) if "curriculum/level" in r]
  return int(levels[-1]) if levels else int(cur.start)


def run_study(out, *, variants, seeds, steps_n, preset="", overrides=()):
  """Trains every (variant, seed) not yet finished; writes and returns depth.json."""
  variants = check_variants(variants)
  os.makedirs(out, exist_ok=True)
  start = time.time()
  # Seed-major: one full replicate finishes before the next starts.
  runs = [sweep.Run(f"{v}/seed_{seed}",
                    variant_config(v, steps_n=steps_n, seed=seed, preset=preset,
                                   overrides=overrides),
                    paper.run_dir(out, v, seed))
          for seed in range(seeds) for v in variants]
  by_name = sweep.run_all(runs)
  config0 = {run.name: run.config for run in runs}  # costs do not depend on the seed
  e = config0[f"{variants[0]}/seed_0"].data.embedded
  summary = {"study": {
      "steps_n": steps_n, "seeds": seeds, "preset": preset or "configs/chase.py default",
      "overrides": [f"{k}={v!r}" for k, v in overrides],
      "trained_max_hops": int(e.max_hops),
      "eval_max_hops": int(e.eval_max_hops or e.max_hops),
      "wall_time_s_this_invocation": None,
      # Sum over runs of the invocation that trained each (excludes aggregation).
      "wall_time_s_all_runs": sum(r["info"]["wall_time_s"] for r in by_name.values()),
      "machine": machine.describe(), "std": "sample std over seeds (ddof=1; 0 for one seed)",
      "h90": f"per seed, the largest h with test accuracy >= {H90_THRESHOLD} at the trained "
             "depth for every h' <= h (0 if h = 1 fails); mean / std over seeds",
      "tolerances_points": {"monotone_r_1_to_R": MONOTONE_TOL_POINTS,
                            "extrapolation_r_R+1_to_2R": EXTRAPOLATION_TOL_POINTS},
      "goals_points": dict(GOALS)}}
  for v in variants:
    config = config0[f"{v}/seed_0"]
    summary[v] = variant_summary(
        v, config, [by_name[f"{v}/seed_{s}"] for s in range(seeds)], paper.model_costs(config),
        levels=[curriculum_level(paper.run_dir(out, v, s), config) for s in range(seeds)])
  variants_only = report.study_variants(summary)
  summary["claims"] = claims(variants_only, summary["study"]["trained_max_hops"])
  summary["study"]["wall_time_s_this_invocation"] = time.time() - start
  with open(os.path.join(out, "depth.json"), "w") as f:
    json.dump(summary, f, indent=2)
  plot_accuracy_by_hops(summary, os.path.join(out, "accuracy_by_hops.png"))
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(tables(summary))
  return summary


# ---- aggregation (pure) --------------------------------------------------------------


def h90(by_hops, depth, threshold=H90_THRESHOLD):
  """One seed's h90 from its results.json by_hops {h: {r: accuracy}} at `depth`."""
  best = 0
  while True:
    acc = by_hops.get(str(best + 1), {}).get(str(depth))
    if acc is None or acc < threshold:
      return best
    best += 1


def variant_summary(name, config, records, costs, levels=()):
  """One variant's depth.json entry from its per-seed records ({'results', 'info'}),
  paper.model_costs(config) and the per-seed curriculum levels."""
  spec = depth_configs.VARIANTS[name]
  depth = int(config.model.recursion.num_steps)
  steps_n = int(config.train.total_steps)
  agg = report.aggregate(records, train_steps=steps_n)
  test = agg["splits"]["test"]
  per_seed = [r["results"]["splits"]["test"] for r in records]
  return {
      "about": spec.about, "mode": spec.mode,
      "overrides": [f"{k}={v!r}" for k, v in spec.overrides],
      "recursion_mode": config.model.recursion.mode,
      "decoder_depth": int(config.model.decoder.depth),
      "trained_depth": depth,
      "recursion_steps": depth,  # report.py's name for it
      "evaluated_depth": max(int(d) for d in test["accuracy_by_depth"]),
      "train_steps": steps_n,
      "param_count": costs["param_count"],
      "flops_per_example": {
          "train": costs["train_flops_per_example"],
          "inference": costs["inference_flops_per_example_by_depth"][str(depth)]},
      "train_flops_total": (costs["train_flops_per_example"]
                            * int(config.data.batch_size) * steps_n),
      "accuracy_by_hops_and_depth": test["by_hops"],
      "accuracy_at_trained_depth": test["accuracy_by_depth"][str(depth)],
      "h90": report.mean_std([h90(s["by_hops"], depth) for s in per_seed]),
      "flips_to_wrong_by_depth": report.mean_std_by_depth(
          [s.get("flips_to_wrong_by_depth", {}) for s in per_seed]),
      "fig1": {k: test[k] for k in FIG1_KEYS},
      "majority_baseline": test["majority_baseline"],
      "curriculum_final_level": report.mean_std(levels),
      **agg,
  }


def _acc_by_hops(variant, depth):
  """{h: [accuracy per seed]} at `depth`, over the hop counts evaluated there."""
  return {int(h): by_r[str(depth)]["values"]
          for h, by_r in variant["accuracy_by_hops_and_depth"].items() if str(depth) in by_r}


def _hop_mean(variant, hops, depth=None):
  """Per seed: accuracy at `depth` (default: trained) averaged over `hops` (unweighted)."""
  acc = _acc_by_hops(variant, variant["trained_depth"] if depth is None else depth)
  return np.mean([acc[h] for h in hops], axis=0)


def _not_run(variants, needed):
  missing = [n for n in needed if n not in variants]
  return {"status": NOT_RUN, "missing": missing, "met": None} if missing else None


def _points(values):
  return report.mean_std(100 * np.asarray(values))


def _paired(a, b):
  """Margin (points) of a over b, the sample std of the per-seed differences and
  whether the margin exceeds twice it (None with fewer than two paired seeds)."""
  n = min(len(a), len(b))
  diffs = 100 * (np.asarray(a[:n]) - np.asarray(b[:n]))
  margin = 100 * float(np.mean(a) - np.mean(b))
  std = float(np.std(diffs, ddof=1)) if n > 1 else None
  return {"margin_points": margin, "diff_values_points": diffs.tolist(),
          "diff_std_points": std, "exceeds_2_std": None if std is None else bool(margin > 2 * std)}


def claim_h90(variants):
  """a: rvlm h90 >= 2 x standard h90 (means over seeds) and > 0."""
  missing = _not_run(variants, ("rvlm", "standard"))
  if missing:
    return missing
  r, s = variants["rvlm"]["h90"], variants["standard"]["h90"]
  return {"status": "measured", "goal": "rvlm h90 >= 2 x standard h90 and > 0",
          "rvlm_h90": r, "standard_h90": s,
          "ratio": r["mean"] / s["mean"] if s["mean"] else None,
          # Two zeros double nothing: the claim needs rvlm to solve some h.
          "met": bool(r["mean"] > 0 and r["mean"] >= 2 * s["mean"])}


def hard_hops(variants, max_hops):
  """Trained hop counts standard does not solve: standard's mean h90 < h <= max_hops,
  evaluated for both rvlm and standard at their trained depths."""
  rvlm, std = variants["rvlm"], variants["standard"]
  both = set(_acc_by_hops(rvlm, rvlm["trained_depth"]))
  both &= set(_acc_by_hops(std, std["trained_depth"]))
  return sorted(h for h in both if std["h90"]["mean"] < h <= max_hops)


def claim_hard_hops(variants, base, max_hops):
  """b: rvlm minus `base` on the hard trained hop counts, against GOALS[base]."""
  missing = _not_run(variants, ("rvlm", "standard", base))
  if missing:
    return missing
  hops = hard_hops(variants, max_hops)
  hops = [h for h in hops if h in _acc_by_hops(variants[base], variants[base]["trained_depth"])]
  out = {"hops": hops, "standard_h90_mean": variants["standard"]["h90"]["mean"],
         "max_hops": max_hops, "goal_points": GOALS[base]}
  if not hops:
    return {"status": "no trained hop count above standard's h90", **out, "met": None}
  rv, bv = _hop_mean(variants["rvlm"], hops), _hop_mean(variants[base], hops)
  paired = _paired(rv, bv)
  return {"status": "measured", **out, "rvlm_points": _points(rv), f"{base}_points": _points(bv),
          **paired, "met": bool(paired["margin_points"] >= GOALS[base])}


def claim_monotone(variants):
  """c: rvlm accuracy by depth non-decreasing over 1..R (tolerance MONOTONE_TOL_POINTS
  per step) and never more than EXTRAPOLATION_TOL_POINTS below r = R beyond R."""
  missing = _not_run(variants, ("rvlm",))
  if missing:
    return missing
  v = variants["rvlm"]
  big_r = v["trained_depth"]
  acc = {int(d): 100 * m["mean"] for d, m in v["accuracy_by_depth"].items()}
  steps = [acc[r + 1] - acc[r] for r in range(1, big_r)]
  eps = 1e-9  # float noise, far below any tolerance
  within = all(s >= -MONOTONE_TOL_POINTS - eps for s in steps)
  beyond = {r: acc[big_r] - acc[r] for r in sorted(acc) if big_r < r <= 2 * big_r}
  beyond_ok = (all(d <= EXTRAPOLATION_TOL_POINTS + eps for d in beyond.values())
               if beyond else None)
  return {"status": "measured" if beyond else "measured 1..R only (no depth beyond R evaluated)",
          "accuracy_by_depth_points": {str(r): a for r, a in sorted(acc.items())},
          "step_changes_1_to_R_points": steps,
          "worst_step_change_points": min(steps) if steps else None,
          "monotone_tolerance_points": MONOTONE_TOL_POINTS,
          "non_decreasing_1_to_R": bool(within),
          "drop_below_R_points": {str(r): d for r, d in beyond.items()},
          "worst_drop_below_R_points": max(beyond.values()) if beyond else None,
          "extrapolation_tolerance_points": EXTRAPOLATION_TOL_POINTS,
          "holds_R_plus_1_to_2R": beyond_ok,
          "met": None if beyond_ok is None else bool(within and beyond_ok)}


def claim_extrapolation(variants, max_hops):
  """d: rvlm's gain from r = R to r = 2R on test hop counts above max_hops."""
  missing = _not_run(variants, ("rvlm",))
  if missing:
    return missing
  v = variants["rvlm"]
  big_r = v["trained_depth"]
  to = min(2 * big_r, v["evaluated_depth"])
  out = {"from_depth": big_r, "to_depth": to, "max_hops": max_hops}
  if to <= big_r:
    return {"status": "no depth beyond R evaluated", **out, "met": None}
  hops = sorted(h for h in set(_acc_by_hops(v, big_r)) & set(_acc_by_hops(v, to))
                if h > max_hops)
  if not hops:
    return {"status": "no test hop count above max_hops", **out, "met": None}
  at_r, at_to = _hop_mean(v, hops, big_r), _hop_mean(v, hops, to)
  gain = _points(at_to - at_r)
  per_hop = {str(h): 100 * (float(np.mean(_acc_by_hops(v, to)[h]))
                            - float(np.mean(_acc_by_hops(v, big_r)[h]))) for h in hops}
  return {"status": "measured", **out, "hops": hops,
          "accuracy_at_R_points": _points(at_r), "accuracy_at_2R_points": _points(at_to),
          "gain_points": gain, "gain_by_hops_points": per_hop,
          "exceeds_2_std": (None if len(gain["values"]) < 2
                            else bool(gain["mean"] > 2 * gain["std"])),
          "met": bool(gain["mean"] > 0)}


def claims(variants, max_hops):
  """Every claim of the module docstring; `variants` as report.study_variants gives."""
  out = {"a_h90_rvlm_at_least_2x_standard": claim_h90(variants)}
  for base in GOALS:
    out[f"b_hard_hops_rvlm_minus_{base}"] = claim_hard_hops(variants, base, max_hops)
  out["c_rvlm_monotone_in_depth"] = claim_monotone(variants)
  out["d_rvlm_gain_R_to_2R_beyond_trained_hops"] = claim_extrapolation(variants, max_hops)
  return out


# ---- plot and tables -----------------------------------------------------------------


def plot_accuracy_by_hops(summary, path):
  """Left: every variant's accuracy against h at its trained depth. Right: rvlm's at
  each depth r = 1..2R. Dashed: the largest trained h."""
  plt = report._plt()  # pylint: disable=protected-access
  variants = report.study_variants(summary)
  max_hops = summary["study"]["trained_max_hops"]
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))

  def curve(ax, by_hops, depth, offset, **kw):
    hs = sorted((int(h) for h, by_r in by_hops.items() if str(depth) in by_r))
    m = [100 * by_hops[str(h)][str(depth)]["mean"] for h in hs]
    s = [100 * by_hops[str(h)][str(depth)]["std"] for h in hs]
    ax.errorbar([h + offset for h in hs], m, yerr=s, marker="o", ms=3, capsize=2, **kw)

  for i, (name, v) in enumerate(variants.items()):
    curve(axes[0], v["accuracy_by_hops_and_depth"], v["trained_depth"],
          0.04 * (i - len(variants) / 2), label=f"{name} (r={v['trained_depth']})",
          color=f"C{i % 10}")
  axes[0].set_title(f"each variant at its trained depth ({summary['study']['seeds']} seeds, "
                    "mean ± std)")
  if "rvlm" in variants:
    v = variants["rvlm"]
    cmap = plt.get_cmap("viridis")
    top = v["evaluated_depth"]
    for r in range(1, top + 1):
      curve(axes[1], v["accuracy_by_hops_and_depth"], r, 0.03 * (r - top / 2),
            label=f"r = {r}" + (" (trained)" if r == v["trained_depth"] else ""),
            color=cmap(r / (top + 1)), lw=2.2 if r == v["trained_depth"] else 1.2)
    axes[1].set_title("rvlm at each depth r")
  else:
    axes[1].text(0.5, 0.5, "rvlm not run", ha="center", transform=axes[1].transAxes)
  for ax in axes:
    ax.axvline(max_hops + 0.5, color="grey", ls="--", lw=1, label=f"trained h <= {max_hops}")
    ax.set_xlabel("hops h")
    ax.set_ylabel("test exact match (points)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _pm(m, scale=100.0, digits=1):
  return report._pm(m, scale, digits)  # pylint: disable=protected-access


def _num(x, fmt="{:+.1f}"):
  return "—" if x is None else fmt.format(x)


def _claim_line(name, c):
  if c["status"] == NOT_RUN:
    return f"- {name}: not run (missing {', '.join(c['missing'])})"
  met = {True: "MET", False: "not met", None: "undecided"}[c["met"]]
  if name.startswith("a_"):
    return (f"- {name}: rvlm h90 {c['rvlm_h90']['mean']:.2f} vs standard "
            f"{c['standard_h90']['mean']:.2f} (goal: >= 2x) -> {met}")
  if name.startswith("b_"):
    head = f"- {name}: hops {c['hops']} (standard h90 {c['standard_h90_mean']:.2f})"
    if c["status"] != "measured":
      return f"{head}: {c['status']} -> {met}"
    return (f"{head}: margin {c['margin_points']:+.1f} points (goal >= "
            f"{c['goal_points']:+g}), seed std of the difference "
            f"{_num(c['diff_std_points'], '{:.1f}')}, exceeds 2 std: {c['exceeds_2_std']} "
            f"-> {met}")
  if name.startswith("c_"):
    return (f"- {name}: worst step change over r = 1..R {_num(c['worst_step_change_points'])} "
            f"points (tolerance -{c['monotone_tolerance_points']:g}), worst drop below r = R "
            f"beyond R {_num(c['worst_drop_below_R_points'])} points (tolerance "
            f"{c['extrapolation_tolerance_points']:g}) -> {met}")
  if c["status"] != "measured":
    return f"- {name}: {c['status']} -> {met}"
  return (f"- {name}: hops {c['hops']}, r = {c['from_depth']} -> {c['to_depth']}: "
          f"{_pm(c['accuracy_at_R_points'], 1)} -> {_pm(c['accuracy_at_2R_points'], 1)}, "
          f"gain {_pm(c['gain_points'], 1)} points -> {met}")


def tables(summary):
  variants = report.study_variants(summary)
  study = summary["study"]
  wall = study["wall_time_s_this_invocation"]
  lines = [f"Depth study: N = {study['steps_n']} steps, {study['seeds']} seed(s), trained "
           f"h <= {study['trained_max_hops']}, test h <= {study['eval_max_hops']}; accuracy "
           "in points (mean ± sample std over seeds)"
           + (f"; this invocation {wall:.0f} s." if wall is not None else "."), ""]
  head = ("| variant | trained r | params | steps | test acc at trained r | h90 (per seed) "
          "| train GFLOP/ex | inference GFLOP/ex | final α | curriculum level |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  for name, v in variants.items():
    alpha = v["connector_alpha_final"]["mean"]
    level = v["curriculum_final_level"]["values"]
    h = v["h90"]
    lines.append(
        f"| {name} | {v['trained_depth']} | {v['param_count'] / 1e6:.3f}M | {v['train_steps']} "
        f"| {_pm(v['accuracy_at_trained_depth'])} | {h['mean']:.2f} ± {h['std']:.2f} "
        f"({', '.join(str(int(x)) for x in h['values'])}) "
        f"| {v['flops_per_example']['train'] / 1e9:.3f} "
        f"| {v['flops_per_example']['inference'] / 1e9:.3f} "
        f"| {'—' if alpha is None else f'{alpha:.3f}'} "
        f"| {', '.join(str(int(x)) for x in level) or '—'} |")
  # Accuracy by h at each variant's trained depth.
  names = list(variants)
  hops = sorted({int(h) for v in variants.values() for h in v["accuracy_by_hops_and_depth"]})
  lines += ["", "Test accuracy by hop count h at each variant's trained depth "
            f"(h > {study['trained_max_hops']}: never trained):", "",
            "| h | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for h in hops:
    cells = []
    for v in variants.values():
      by_r = v["accuracy_by_hops_and_depth"].get(str(h), {})
      cells.append(_pm(by_r.get(str(v["trained_depth"]))))
    lines.append(f"| {h} | " + " | ".join(cells) + " |")
  if "rvlm" in variants:
    v = variants["rvlm"]
    depths = range(1, v["evaluated_depth"] + 1)
    lines += ["", f"rvlm test accuracy by hop count h and depth r (trained r = "
              f"{v['trained_depth']}):", "",
              "| h | " + " | ".join(f"r={r}" for r in depths) + " |",
              "|---|" + "---|" * len(depths)]
    for h, by_r in sorted(v["accuracy_by_hops_and_depth"].items(), key=lambda kv: int(kv[0])):
      lines.append(f"| {h} | " + " | ".join(_pm(by_r.get(str(r))) for r in depths) + " |")
    lines.append("| all | " + " | ".join(_pm(v["accuracy_by_depth"].get(str(r)))
                                         for r in depths) + " |")
  recursive = {n: v for n, v in variants.items() if v["trained_depth"] > 1}
  if recursive:
    top = max(v["evaluated_depth"] for v in recursive.values())
    lines += ["", "Flips to wrong (share of test examples right at r-1, wrong at r; "
              "points):", "", "| variant | " + " | ".join(f"r={r}" for r in range(2, top + 1))
              + " |", "|---|" + "---|" * (top - 1)]
    for name, v in recursive.items():
      f = v["flips_to_wrong_by_depth"]
      lines.append(f"| {name} | " + " | ".join(_pm(f.get(str(r)), digits=2)
                                               for r in range(2, top + 1)) + " |")
    lines += ["", "Fig. 1 diagnostics (test): final hidden-state norm / step-input norm / "
              "CKA(step input, E_0):", "",
              "| variant | " + " | ".join(f"r={r}" for r in range(1, top + 1)) + " |",
              "|---|" + "---|" * top]
    for name, v in recursive.items():
      fig1 = v["fig1"]
      cells = []
      for r in range(1, top + 1):
        d = str(r)
        if d not in fig1["hidden_norm_by_depth"]:
          cells.append("")
          continue
        cells.append(f"{fig1['hidden_norm_by_depth'][d]['mean']:.1f} / "
                     f"{fig1['input_norm_by_depth'][d]['mean']:.1f} / "
                     f"{fig1['cka_with_e0_by_depth'][d]['mean']:.2f}")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "Claims (module docstring of rvlm/experiments/depth.py):", ""]
  lines += [_claim_line(name, c) for name, c in summary["claims"].items()]
  return "\n".join(lines) + "\n"


def main(argv):
  paper.main(argv, study=run_study, tables=tables, quick_steps=QUICK_STEPS,
             quick_eval=QUICK_EVAL)


if __name__ == "__main__":
  paper.define_flags(budget=depth_configs.STEPS, variants=depth_configs.VARIANTS, preset="",
                     quick_steps=QUICK_STEPS, quick_eval=QUICK_EVAL)
  flags.mark_flags_as_required(["out"])
  app.run(main)
