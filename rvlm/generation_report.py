"""The files of `python -m rvlm.evaluate`: W/eval/generation_<split>.{json,md,png}, and
the compact table it prints. The payload comes from rvlm.generation_eval.evaluate."""
import json
import os

import jax

from rvlm.utils import machine as machine_lib


def machine():
  """What the latencies were measured on: rvlm.utils.machine.describe() and the jax devices."""
  devices = jax.devices()
  return {**machine_lib.describe(), "backend": jax.default_backend(),
          "devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
          "jax_version": jax.__version__}


def write(workdir, split, payload):
  """Writes the three files; returns their paths."""
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  base = os.path.join(out, f"generation_{split}")
  with open(base + ".json.tmp", "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(base + ".json.tmp", base + ".json")
  with open(base + ".md", "w") as f:
    f.write(markdown(payload))
  plot(base + ".png", payload)
  return [base + ".json", base + ".md", base + ".png"]


def _rows(payload):
  """(label, result) for every fixed depth, then every adaptive threshold."""
  rows = [(f"r = {d}", res)
          for d, res in sorted(payload["by_depth"].items(), key=lambda x: int(x[0]))]
  rows += [(f"adaptive {t} (R = {payload['trained_depth']})", res)
           for t, res in sorted(payload["adaptive"].items(), key=lambda x: float(x[0]))]
  return rows


def table(payload):
  """The compact summary printed to stdout."""
  lines = [f"{payload['split']}: {payload['num_examples']} examples, step {payload['step']}, "
           f"greedy, max {payload['max_new_tokens']} new tokens",
           f"{'':<24} {'exact':>6} {'norm.':>6} {'F1':>6} {'ms/token':>9} {'tokens/s':>9} "
           f"{'steps/token':>11}"]
  for label, res in _rows(payload):
    lines.append(f"{label:<24} {res['exact_match']:>6.3f} "
                 f"{res['normalised_exact_match']:>6.3f} {res['f1']:>6.3f} {res['ms_per_token']:>9.2f} "
                 f"{res['tokens_per_s']:>9.1f} {res['mean_steps_per_token']:>11.2f}")
  lines.append(f"majority normalised answer: {payload['normalised_majority_baseline']:.3f}")
  return "\n".join(lines)


def _breakdown(payload, key, title):
  """Exact match per group and depth, 'strict / normalised'."""
  depths = sorted(payload["by_depth"], key=int)
  groups = sorted({g for d in depths for g in payload["by_depth"][d][key]},
                  key=lambda g: (int(g) if g.isdigit() else g))
  if not groups:
    return []
  lines = [f"## Exact match by {title} (strict / normalised)", "",
           f"| {title} | n | " + " | ".join(f"r = {d}" for d in depths) + " |",
           "|---|---|" + "---|" * len(depths)]
  for g in groups:
    n = next(payload["by_depth"][d][key][g]["num_examples"] for d in depths)
    parts = [payload["by_depth"][d][key][g] for d in depths]
    cells = [f"{p['exact_match']:.3f} / {p['normalised_exact_match']:.3f}" for p in parts]
    lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
  return lines + [""]


def markdown(payload):
  m = payload["machine"]
  lines = [f"# Generated answers: {payload['split']} split, step {payload['step']}", "",
           f"{payload['num_examples']} examples, greedy decoding, at most "
           f"{payload['max_new_tokens']} new tokens, batch {payload['batch_size']}; trained "
           f"depth R = {payload['trained_depth']}. Exact match: the generated answer equals "
           "the reference and ends with eos. F1: bag-of-tokens (SQuAD-style). Latency: "
           "wall time of generate (prefill included, compile excluded) per generated token, "
           f"batch-amortised, on {m['processor']} ({m['cpu_count']} cores, {m['device_kind']})."]
  lines += ["", "Normalised: both answers decoded to text and compared after the VQA v2 "
            "answer processing (lower case, no punctuation but a number's decimal "
            "point, no articles, number words as digits; rvlm/answers.py), so that "
            "\"Yes.\" equals \"yes\"; the answer must still end with eos. Always giving "
            "the most frequent normalised reference answer scores "
            f"{payload['normalised_majority_baseline']:.3f}."]
  lines += ["", "| setting | exact match | normalised | F1 | ms/token | tokens/s | steps/token |",
            "|---|---|---|---|---|---|---|"]
  for label, res in _rows(payload):
    lines.append(f"| {label} | {res['exact_match']:.3f} | "
                 f"{res['normalised_exact_match']:.3f} | {res['f1']:.3f} | "
                 f"{res['ms_per_token']:.2f} | {res['tokens_per_s']:.1f} | "
                 f"{res['mean_steps_per_token']:.2f} |")
  lines.append("")
  if payload["adaptive"]:
    lines += ["## Adaptive exit at R = {}".format(payload["trained_depth"]), "",
              "| threshold | exact match | normalised | mean steps | share of R | ms/token |",
              "|---|---|---|---|---|---|"]
    for t, res in sorted(payload["adaptive"].items(), key=lambda x: float(x[0])):
      lines.append(f"| {t} | {res['exact_match']:.3f} | {res['normalised_exact_match']:.3f} | "
                   f"{res['mean_steps_per_token']:.2f} | "
                   f"{res['steps_fraction_of_trained']:.2f} | {res['ms_per_token']:.2f} |")
    lines.append("")
  lines += _breakdown(payload, "by_family", "family") + _breakdown(payload, "by_hops", "hops")
  return "\n".join(lines)


def plot(path, payload):
  """Left: accuracy and per-token latency against depth. Right: accuracy against mean
  steps used per token, adaptive thresholds next to the fixed depths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  depths = sorted(payload["by_depth"], key=int)
  fixed = [payload["by_depth"][d] for d in depths]
  x = [int(d) for d in depths]
  ax.plot(x, [r["exact_match"] for r in fixed], marker="o", label="exact match")
  ax.plot(x, [r["f1"] for r in fixed], marker="s", ls="--", label="token F1")
  ax.plot(x, [r["normalised_exact_match"] for r in fixed], marker="v", ls=":",
          label="normalised exact match")
  ax.set_xticks(x)
  ax.set_xlabel("recursion depth r")
  ax.set_ylabel("accuracy")
  ax.set_ylim(-0.02, 1.02)
  lat = ax.twinx()
  lat.plot(x, [r["ms_per_token"] for r in fixed], marker="^", color="tab:red", label="ms/token")
  lat.set_ylabel("ms per generated token", color="tab:red")
  lat.set_ylim(bottom=0)  # from 0, so that the cost of each step reads as a ratio
  handles = ax.get_legend_handles_labels()[0] + lat.get_legend_handles_labels()[0]
  ax.legend(handles, [h.get_label() for h in handles], loc="lower right", fontsize=8)
  ax.set_title("greedy generation by depth")

  ax2.plot([r["mean_steps_per_token"] for r in fixed], [r["exact_match"] for r in fixed],
           marker="o", label="fixed depth")
  for d, r in zip(depths, fixed):
    ax2.annotate(f"r={d}", (r["mean_steps_per_token"], r["exact_match"]), fontsize=8,
                 xytext=(3, 3), textcoords="offset points")
  adaptive = sorted(payload["adaptive"].items(), key=lambda t: float(t[0]))
  if adaptive:
    ax2.plot([r["mean_steps_per_token"] for _, r in adaptive],
             [r["exact_match"] for _, r in adaptive], marker="D", ls="--",
             label=f"adaptive (R = {payload['trained_depth']})")
    for t, r in adaptive:
      ax2.annotate(t, (r["mean_steps_per_token"], r["exact_match"]), fontsize=8,
                   xytext=(3, -10), textcoords="offset points")
  ax2.set_xlabel("mean recursion steps per token")
  ax2.set_ylabel("exact match")
  ax2.set_ylim(-0.02, 1.02)
  ax2.set_title("accuracy against compute")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
