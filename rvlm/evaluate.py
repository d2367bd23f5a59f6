"""Per-depth teacher-forced evaluation: exact match at every r = 1..R from one pass,
by question family and hop count, plus the paper's Fig. 1 diagnostics."""
import collections
import json
import os

import numpy as np
from jax.experimental import multihost_utils

from rvlm import sharding as sharding_lib


def majority_baseline(batches):
  """Accuracy of always answering the split's most frequent answer."""
  answers = []
  for b in batches:
    for i in np.flatnonzero(b["example_mask"]):
      answers.append(tuple(b["tokens"][i][b["mask_loss"][i] > 0]))
  if not answers:
    return 0.0
  return collections.Counter(answers).most_common(1)[0][1] / len(answers)


def evaluate_split(eval_fn, params, batches, mesh, family_names):
  """Runs `eval_fn` (a jitted rvlm.steps.eval_step) over `batches` of one split.

  Returns {'accuracy_by_depth', 'by_family', 'by_hops', 'flips_to_wrong_by_depth',
  'loss_by_depth', 'input_norm_by_depth', 'hidden_norm_by_depth',
  'cka_with_e0_by_depth', 'num_examples', 'majority_baseline'}; depths are '1'..'R'
  strings (JSON keys), R being the depth eval_fn runs (config.eval.max_depth).
  """
  exact, fams, hops = [], [], []
  sums = collections.defaultdict(float)
  cka, cka_n = 0.0, 0
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
  for b in batches:
    batch = sharding_lib.make_global_batch(b, mesh)
    out = {k: gather(v) for k, v in eval_fn(params, batch).items()}
    # Every process sees every row of the global batch, so all compute the same result.
    keep = gather(batch["example_mask"]) > 0
    exact.append(out["exact"][:, keep])
    fams.append(gather(batch["family"])[keep])
    hops.append(gather(batch["hops"])[keep])
    for k in ("token_loss_sum", "token_count", "input_norm_sum", "hidden_norm_sum",
              "real_tokens", "real_text_tokens"):
      sums[k] = sums[k] + np.asarray(out[k], np.float64)
    cka, cka_n = cka + np.asarray(out["cka_with_e0"], np.float64), cka_n + 1
  exact = np.concatenate(exact, axis=1)                        # [R, N]
  fams, hops = np.concatenate(fams), np.concatenate(hops)
  depths = [str(r + 1) for r in range(exact.shape[0])]
  by_depth = lambda sel: {d: float(exact[r, sel].mean()) for r, d in enumerate(depths)}  # noqa: E731
  return {
      "num_examples": int(exact.shape[1]),
      "accuracy_by_depth": by_depth(slice(None)),
      "by_family": {family_names[f]: by_depth(fams == f) for f in np.unique(fams)},
      "by_hops": {str(h): by_depth(hops == h) for h in np.unique(hops)},
      # Share of examples right after step r-1 and wrong after step r (r >= 2):
      # what a later step breaks, which accuracy alone hides behind what it fixes.
      "flips_to_wrong_by_depth": {d: float((exact[r - 1] & ~exact[r]).mean())
                                  for r, d in enumerate(depths) if r},
      "loss_by_depth": dict(zip(depths, (sums["token_loss_sum"] / max(sums["token_count"], 1)).tolist())),
      "input_norm_by_depth": dict(zip(depths, (sums["input_norm_sum"] / max(sums["real_tokens"], 1)).tolist())),
      "hidden_norm_by_depth": dict(zip(depths, (sums["hidden_norm_sum"] / max(sums["real_text_tokens"], 1)).tolist())),
      "cka_with_e0_by_depth": dict(zip(depths, (cka / max(cka_n, 1)).tolist())),
      "majority_baseline": majority_baseline(batches),
  }


def scalars(split, result):
  """Flat {name: value} of a split's result for the metric writer."""
  out = {f"{split}/majority_baseline": result["majority_baseline"]}
  for key in ("accuracy_by_depth", "loss_by_depth", "input_norm_by_depth",
              "hidden_norm_by_depth", "cka_with_e0_by_depth"):
    name = key.replace("_by_depth", "")
    out.update({f"{split}/{name}/r{d}": v for d, v in result[key].items()})
  return out


def write_results(workdir, step, results, primary):
  """results.json (primary split at the top level, every split under 'splits') and a
  plot of accuracy against depth."""
  top = dict(results[primary])
  payload = {"step": int(step), "split": primary, **top, "splits": results}
  path = os.path.join(workdir, "results.json")
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  plot_accuracy_by_depth(os.path.join(workdir, "accuracy_by_depth.png"), results)
  return payload


def plot_accuracy_by_depth(path, results):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for split, res in results.items():
    depths = sorted(res["accuracy_by_depth"], key=int)
    line, = ax.plot([int(d) for d in depths], [res["accuracy_by_depth"][d] for d in depths],
                    marker="o", label=split)
    ax.axhline(res["majority_baseline"], color=line.get_color(), ls=":", lw=1)
  ax.set_xticks(sorted({int(d) for res in results.values() for d in res["accuracy_by_depth"]}))
  ax.set_xlabel("recursion depth r")
  ax.set_ylabel("exact-match accuracy")
  ax.set_title("accuracy by depth (dotted: majority answer)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
