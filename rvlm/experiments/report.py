"""Aggregation over seeds, the claim checks, plots and markdown tables of a study.

Pure functions of per-run results.json / run_info.json records, so the study's
summary can be rebuilt (and tested) without training anything.
"""
import ast

import numpy as np

# Per-depth quantities of a split's results.json, aggregated the same way.
DEPTH_KEYS = ("accuracy_by_depth", "loss_by_depth", "input_norm_by_depth",
              "hidden_norm_by_depth", "cka_with_e0_by_depth")
# The paper's comparisons: RecursiveVLM at depth R against these, in points.
GOALS = {"standard": 3.0, "vanilla": 7.0}


# results.json: one top-level entry per variant name, plus these two.
META_KEYS = ("study", "claims")


def study_variants(summary):
  """{variant name: its summary} of a study's results.json."""
  return {k: v for k, v in summary.items() if k not in META_KEYS}


def parse_override(text):
  """'a.b=value' -> ('a.b', python literal or the raw string)."""
  field, sep, value = text.partition("=")
  if not sep or not field:
    raise ValueError(f"--set expects field=value, got {text!r}")
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  return field, value


def mean_std(values):
  """{'mean', 'std', 'values'}; std is the sample std (ddof=1), 0 for one value."""
  v = np.asarray([float(x) for x in values if x is not None], np.float64)
  if v.size == 0:
    return {"mean": None, "std": None, "values": []}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "values": v.tolist()}


def mean_std_by_depth(dicts):
  """[{depth: value}, ...] (one per seed) -> {depth: mean_std}."""
  depths = sorted(dicts[0], key=int)
  return {d: mean_std([x[d] for x in dicts]) for d in depths}


def _nested_by_depth(dicts):
  """{group: {depth: value}} per seed -> {group: {depth: mean_std}}; groups seen in
  every seed only (a family absent from one seed's sample has no mean over seeds)."""
  groups = set(dicts[0]).intersection(*dicts[1:]) if len(dicts) > 1 else set(dicts[0])
  return {g: mean_std_by_depth([x[g] for x in dicts]) for g in sorted(groups)}


def aggregate_split(split_results):
  out = {key: mean_std_by_depth([r[key] for r in split_results]) for key in DEPTH_KEYS}
  out["by_family"] = _nested_by_depth([r["by_family"] for r in split_results])
  out["by_hops"] = _nested_by_depth([r["by_hops"] for r in split_results])
  out["majority_baseline"] = mean_std([r["majority_baseline"] for r in split_results])
  out["num_examples"] = int(split_results[0]["num_examples"])
  return out


def aggregate(records, train_steps=None):
  """Records of one variant (one per seed: {'results', 'info'}) -> its summary.

  With `train_steps`, 'train_time_s' is the training loop's own time (steps over the
  logged median steps/s), without compilation and evaluation.
  """
  splits = sorted(records[0]["results"]["splits"])
  agg = {"splits": {s: aggregate_split([r["results"]["splits"][s] for r in records])
                    for s in splits}}
  primary = "test" if "test" in splits else splits[0]
  agg["accuracy_by_depth"] = agg["splits"][primary]["accuracy_by_depth"]
  agg["num_seeds"] = len(records)
  info = [r["info"] for r in records]
  agg["wall_time_s"] = mean_std([i["wall_time_s"] for i in info])
  agg["steps_per_sec"] = mean_std([i["steps_per_sec"] for i in info])
  if train_steps:
    agg["train_time_s"] = mean_std([train_steps / i["steps_per_sec"] for i in info
                                    if i["steps_per_sec"]])
  alphas = [i["connector_alpha_final"] for i in info]
  agg["connector_alpha_final"] = mean_std(alphas)
  # A connector whose residual scale went to ~0 has switched recursion off: such a run
  # is the standard model repeated, not RecursiveVLM, and is counted as failed.
  agg["collapsed_runs"] = sum(a is not None and a < 1e-3 for a in alphas)
  return agg


def final_accuracy(variant):
  acc = variant["accuracy_by_depth"]
  return acc[max(acc, key=int)]["mean"]


def claims(variants):
  """The paper's claims checked on the test split (points = 100 x accuracy)."""
  out = {}
  if "rvlm" not in variants:
    return out
  rvlm = variants["rvlm"]
  r_final = final_accuracy(rvlm)
  for base in ("standard", "standard_iso_flops", "vanilla"):
    if base in variants:
      diff = 100 * (r_final - final_accuracy(variants[base]))
      out[f"rvlm_minus_{base}_points"] = diff
      if base in GOALS:
        out[f"beats_{base}_by_{GOALS[base]:g}_points"] = bool(diff >= GOALS[base])
  for name in ("rvlm", "twostage_rvlm"):
    if name in variants:
      means = [m["mean"] for _, m in sorted(variants[name]["accuracy_by_depth"].items(),
                                            key=lambda kv: int(kv[0]))]
      out[f"{name}_non_decreasing_in_depth"] = bool(np.all(np.diff(means) >= 0))
  if "twostage_rvlm" in variants:
    for base in ("twostage_standard", "twostage_vanilla"):
      if base in variants:
        out[f"twostage_rvlm_minus_{base}_points"] = 100 * (
            final_accuracy(variants["twostage_rvlm"]) - final_accuracy(variants[base]))
  return out


# ---- plots ---------------------------------------------------------------------------


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _curve(ax, name, by_depth, max_depth, offset=0.0, **kw):
  depths = sorted(by_depth, key=int)
  mean = np.array([by_depth[d]["mean"] for d in depths])
  std = np.array([by_depth[d]["std"] for d in depths])
  if len(depths) == 1:  # R = 1: a level line across the depths, for comparison
    ax.axhline(mean[0], ls="--", label=name, **kw)
    ax.axhspan(mean[0] - std[0], mean[0] + std[0], alpha=0.12, **kw)
    return
  x = [int(d) + offset for d in depths]  # offset: overlapping error bars stay legible
  ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=name, **kw)
  ax.set_xticks(range(1, max_depth + 1))


def plot_accuracy(summary, path):
  plt = _plt()
  variants = study_variants(summary)
  max_depth = max(v["recursion_steps"] for v in variants.values())
  panels = [("main comparison", [n for n in variants if not n.startswith("rvlm_")]),
            ("RecursiveVLM ablations", ["rvlm"] + [n for n in variants if n.startswith("rvlm_")])]
  panels = [(t, [n for n in names if n in variants]) for t, names in panels]
  panels = [(t, names) for t, names in panels if names]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
  for ax, (title, names) in zip(axes[0], panels):
    for i, name in enumerate(names):
      _curve(ax, name, variants[name]["accuracy_by_depth"], max_depth,
             offset=0.03 * (i - len(names) / 2), color=f"C{i % 10}")
    test = next(iter(variants.values()))["splits"].get("test")
    if test:
      ax.axhline(test["majority_baseline"]["mean"], color="grey", ls=":", lw=1,
                 label="majority answer")
    ax.set_xlabel("recursion depth r (answer read after step r)")
    ax.set_ylabel("test exact match")
    ax.set_title(f"{title} ({summary['study']['seeds']} seeds, mean ± std)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_norm_cka(summary, path):
  """The paper's Fig. 1: per step, the hidden-state norm and the CKA of the step's
  input with the step-1 embeddings E_0."""
  plt = _plt()
  variants = study_variants(summary)
  names = [n for n in variants if variants[n]["recursion_steps"] > 1
           and not n.startswith("rvlm_")]
  if not names:
    return
  splits = variants[names[0]]["splits"]
  split = "test" if "test" in splits else next(iter(splits))
  max_depth = max(variants[n]["recursion_steps"] for n in names)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  panels = (("hidden_norm_by_depth", "mean L2 norm of the final hidden state (text tokens)"),
            ("input_norm_by_depth", "mean L2 norm of the step's input"),
            ("cka_with_e0_by_depth", "linear CKA(step input, E_0)"))
  for ax, (key, label) in zip(axes, panels):
    for i, name in enumerate(names):
      _curve(ax, name, variants[name]["splits"][split][key], max_depth,
             offset=0.03 * (i - len(names) / 2), color=f"C{i % 10}")
    ax.set_xlabel("recursion step r")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  fig.suptitle(f"Fig. 1 diagnostics ({split} split)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---- tables --------------------------------------------------------------------------


def _pm(m, scale=100.0, digits=1):
  if m is None or m["mean"] is None:
    return "—"
  return f"{scale * m['mean']:.{digits}f} ± {scale * m['std']:.{digits}f}"


def tables(summary):
  variants = study_variants(summary)
  study = summary["study"]
  max_depth = max(v["recursion_steps"] for v in variants.values())
  lines = [f"Study: N = {study['steps_n']} steps, {study['seeds']} seeds, preset "
           f"{study['preset']}; accuracy in points (mean ± sample std over seeds).", ""]
  depth_cols = " | ".join(f"test r={d}" for d in range(1, max_depth + 1))
  head = "| variant | params | steps | " + depth_cols
  head += (" | val r=R | train GFLOP/example | train TFLOP total | train s | wall s/run"
           " | final α |")
  lines += [head, "|" + "---|" * (head.count("|") - 1)]
  for name, v in variants.items():
    acc = v["accuracy_by_depth"]
    cells = [_pm(acc.get(str(d))) if str(d) in acc else "" for d in range(1, max_depth + 1)]
    val = v["splits"].get("val", {}).get("accuracy_by_depth")
    val_r = _pm(val[max(val, key=int)]) if val else "—"
    alpha = v["connector_alpha_final"]
    alpha_s = "—" if alpha["mean"] is None else f"{alpha['mean']:.3f}"
    if v["collapsed_runs"]:
      alpha_s += f" ({v['collapsed_runs']} collapsed)"
    train_s = v.get("train_time_s", {}).get("mean")
    train_s = "—" if train_s is None else f"{train_s:.0f}"
    steps = str(v["train_steps"])
    if v["init_from"] in variants:
      steps += f" (+{variants[v['init_from']]['train_steps']} stage 1)"
    lines.append(f"| {name} | {v['param_count'] / 1e6:.3f}M | {steps} | " + " | ".join(cells)
                 + f" | {val_r} | {v['train_flops_per_example'] / 1e9:.3f} | "
                 f"{v['train_flops_total'] / 1e12:.1f} | {train_s} | "
                 f"{v['wall_time_s']['mean']:.0f} | {alpha_s} |")
  maj = next(iter(variants.values()))["splits"].get("test", {}).get("majority_baseline")
  if maj:
    lines += ["", f"Majority-answer baseline (test): {_pm(maj)}."]
  # Families and hop counts at the final depth.
  lines += ["", "Test accuracy at each variant's final depth, by family and hop count:", ""]
  groups = []
  for name, v in variants.items():
    test = v["splits"].get("test")
    if test:
      groups += [("family", g) for g in test["by_family"] if ("family", g) not in groups]
      groups += [("hops", g) for g in test["by_hops"] if ("hops", g) not in groups]
  lines += ["| variant | " + " | ".join(f"{k} {g}" for k, g in groups) + " |",
            "|---|" + "---|" * len(groups)]
  for name, v in variants.items():
    test = v["splits"].get("test")
    if not test:
      continue
    row = []
    for kind, g in groups:
      by = test["by_family" if kind == "family" else "by_hops"].get(g)
      row.append(_pm(by[max(by, key=int)]) if by else "")
    lines.append(f"| {name} | " + " | ".join(row) + " |")
  # Fig. 1 diagnostics.
  lines += ["", "Per-step diagnostics (test): final hidden-state norm / step-input norm / "
            "CKA(step input, E_0):", "",
            "| variant | " + " | ".join(f"r={d}" for d in range(1, max_depth + 1)) + " |",
            "|---|" + "---|" * max_depth]
  for name, v in variants.items():
    test = v["splits"].get("test")
    if not test or v["recursion_steps"] == 1:
      continue
    cells = []
    for d in range(1, v["recursion_steps"] + 1):
      d = str(d)
      cells.append(f"{test['hidden_norm_by_depth'][d]['mean']:.1f} / "
                   f"{test['input_norm_by_depth'][d]['mean']:.1f} / "
                   f"{test['cka_with_e0_by_depth'][d]['mean']:.2f}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if summary.get("claims"):
    lines += ["", "Claims (test, RecursiveVLM at depth R):", ""]
    lines += [f"- {k}: {v:+.1f}" if isinstance(v, float) else f"- {k}: {v}"
              for k, v in summary["claims"].items()]
  return "\n".join(lines) + "\n"
