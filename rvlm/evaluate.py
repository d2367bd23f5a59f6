"""Per-depth teacher-forced evaluation: exact match at every r = 1..R from one pass,
by question family and hop count, plus the paper's Fig. 1 diagnostics.

Run as a module it scores free-running generation of a trained workdir instead
(rvlm/generation_eval.py): exact match, token F1, per-token latency and steps used at
each depth, and the adaptive-exit trade-off at the trained depth R:

  python -m rvlm.evaluate --workdir=W [--split=test] [--depths=1,2,3,6]
      [--adaptive=0.9,0.99] [--num_examples=N] [--batch_size=B] [--max_new_tokens=N]

It writes W/eval/generation_<split>.{json,md,png} and prints a table.
"""
import collections
import json
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np
from jax.experimental import multihost_utils

from rvlm import sharding as sharding_lib
from rvlm.utils import cli


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
  exact, fams, hops, answer_rows = [], [], [], []
  sums = collections.defaultdict(float)
  cka, cka_n = 0.0, 0
  gather = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
  for b in batches:
    batch = sharding_lib.make_global_batch(b, mesh)
    out = {k: gather(v) for k, v in eval_fn(params, batch).items()}
    # Every process sees every row of the global batch, so all compute the same result.
    answer_rows.append({k: gather(batch[k]) for k in ("tokens", "mask_loss", "example_mask")})
    keep = answer_rows[-1]["example_mask"] > 0
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
      "majority_baseline": majority_baseline(answer_rows),
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


# ---- python -m rvlm.evaluate ------------------------------------------------------


class _BadInput(Exception):
  """A command-line mistake: reported in one line, exit code 2."""


def define_flags(fv):
  """The CLI's flags, in their own FlagValues: the trainer imports this module, and
  global flags here would collide with rvlm.main's --workdir."""
  flags.DEFINE_string("workdir", None, "Trained workdir (its latest checkpoint).", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_string("split", "test", "Eval split.", flag_values=fv)
  flags.DEFINE_list("depths", [], "Depths to decode at (default 1..R).", flag_values=fv)
  flags.DEFINE_list("adaptive", [], "Adaptive-exit thresholds in (0, 1] at depth R.",
                    flag_values=fv)
  flags.DEFINE_integer("num_examples", 0, "Examples (0: config.eval.num_examples).",
                       flag_values=fv)
  flags.DEFINE_integer("batch_size", 0, "Decode batch (0: config.eval.batch_size).",
                       flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 0, "Generated tokens per answer (0: the longest "
                       "reference answer + eos).", flag_values=fv)


def _numbers(values, kind, name):
  try:
    return [kind(v) for v in values]
  except ValueError:
    raise _BadInput(f"--{name}={','.join(values)}: not a list of {kind.__name__}s") from None


def _check_args(fv):
  if not fv.workdir:
    raise _BadInput("--workdir is required")
  depths = _numbers(fv.depths, int, "depths")
  if any(d < 1 for d in depths):
    raise _BadInput(f"--depths={','.join(fv.depths)}: every depth must be >= 1")
  thresholds = _numbers(fv.adaptive, float, "adaptive")
  if any(not 0 < t <= 1 for t in thresholds):
    raise _BadInput(f"--adaptive={','.join(fv.adaptive)}: every threshold must be in (0, 1]")
  for name in ("num_examples", "batch_size", "max_new_tokens"):
    if fv[name].value < 0:
      raise _BadInput(f"--{name}={fv[name].value} must be >= 0 (0: the default)")
  return depths, thresholds


def run_cli(fv):
  """Loads, decodes, scores and writes; returns the payload written to the JSON."""
  # Imported here: rvlm.train imports this module, and the decoding side sits above it.
  from rvlm import data as data_lib  # pylint: disable=g-import-not-at-top
  from rvlm import decode  # pylint: disable=g-import-not-at-top
  from rvlm import generation_eval  # pylint: disable=g-import-not-at-top
  from rvlm import generation_report  # pylint: disable=g-import-not-at-top
  from rvlm import inference  # pylint: disable=g-import-not-at-top

  depths, thresholds = _check_args(fv)
  try:
    # Only decoded from here on: the decoding layout, without keeping the stacked one.
    loaded = inference.for_decoding(inference.load(fv.workdir, step=fv.step))
  except inference.InferenceError as e:
    raise _BadInput(str(e)) from None
  config = loaded.config
  trained = int(config.model.recursion.num_steps)
  for d in depths:
    try:
      decode.check_depth(loaded.model, d)
    except ValueError as e:  # a standard model (recursion mode 'none') has depth 1 only
      raise _BadInput(f"--depths={','.join(fv.depths)}: {e}") from None
  depths = depths or list(range(1, 2 if config.model.recursion.mode == "none" else trained + 1))
  num_examples = fv.num_examples or int(config.eval.num_examples)
  batch_size = fv.batch_size or int(config.eval.batch_size)
  try:
    batches = data_lib.build_eval_batches(config, fv.split, batch_size, num_examples)
  except ValueError as e:  # an unknown split, or one with no usable examples
    raise _BadInput(f"--split={fv.split}: {e}") from None
  eos = loaded.tokenizer.eos_id
  max_new = fv.max_new_tokens or generation_eval.default_max_new_tokens(batches, eos)
  result = generation_eval.evaluate(
      loaded, batches, depths=depths, thresholds=thresholds, max_new_tokens=max_new,
      family_names=data_lib.family_names(config))
  payload = {"workdir": os.path.abspath(fv.workdir), "step": int(loaded.step),
             "split": fv.split, "depths": depths, "thresholds": thresholds,
             "batch_size": batch_size, "machine": generation_report.machine(), **result}
  paths = generation_report.write(fv.workdir, fv.split, payload)
  print(generation_report.table(payload))
  print("wrote " + ", ".join(paths))
  return payload


def main(argv):
  """`argv` is the whole command line (program name first), flags included."""
  return cli.run_own_flags(argv, prog="rvlm.evaluate", define_flags=define_flags,
                           run=run_cli, errors=(_BadInput,))


def _global_flags_parser(argv):
  """Library logs are cut to errors: orbax logs every restore at INFO, and stderr is for
  this tool's one-line errors."""
  logging.set_verbosity(logging.ERROR)
  return cli.program_name_only(argv)


if __name__ == "__main__":
  app.run(main, flags_parser=_global_flags_parser)
