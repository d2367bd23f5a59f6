"""Answers questions about images with a trained workdir.

  python -m rvlm.predict --workdir=W --image=scene.png --prompt="what colour is the square ?"
  python -m rvlm.predict --workdir=W --image=scene.png --prompt=... --all_depths
  python -m rvlm.predict --workdir=W --image=DIR --prompt=... [--out=answers.jsonl]
  python -m rvlm.predict --workdir=W --image=records.json --adaptive=0.9

--image is one image file (the answer is printed), a folder (every image in it, with
the same --prompt) or a LLaVA-format JSON/JSONL (each record's image and first human
turn). Folders and JSONs write one JSON line per input to --out (default
W/predictions.jsonl) and print a summary line. The depth defaults to the trained R;
--depth may exceed it (test-time extrapolation), --all_depths answers at every depth
1..depth, and --adaptive=THRESHOLD exits each token once its top probability reaches
THRESHOLD (up to R steps) and reports the steps used.

Every input mistake is one line on stderr, "rvlm.predict: error: ...", and exit code 2.
"""
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from rvlm import decode
from rvlm import inference
from rvlm.utils import cli

_PROG = "rvlm.predict"


def define_flags(fv):
  """The CLI's flags, in their own FlagValues: no collision with other entry points'
  global flags (rvlm.main's --workdir) in one process, and a fresh parse per call."""
  flags.DEFINE_string("workdir", None, "Trained workdir (holds checkpoints/).", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", flag_values=fv)
  flags.DEFINE_string("image", None, "An image file, a folder of images, or a LLaVA-format "
                      ".json/.jsonl (records' images are relative to its folder). None: "
                      "text only.", flag_values=fv)
  flags.DEFINE_string("prompt", None, "The question. With a LLaVA JSON it replaces every "
                      "record's first human turn.", flag_values=fv)
  flags.DEFINE_integer("depth", None, "Recursion depth r >= 1 (default: the trained R; "
                       "above R extrapolates).", flag_values=fv)
  flags.DEFINE_float("adaptive", None, "Adaptive exit: stop recursing on a token once its "
                     "top probability >= this threshold in (0, 1], up to R steps.",
                     flag_values=fv)
  flags.DEFINE_integer("stable_steps", 0, "With --adaptive: also exit once the argmax is "
                       "unchanged for this many consecutive steps (0: off, else >= 2).",
                       flag_values=fv)
  flags.DEFINE_bool("all_depths", False, "Answer at every depth 1..depth.", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", None, "Tokens generated per answer, eos included "
                       "(default: all that fit in config.data.seq_len).", flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "Sampling temperature (0: greedy).", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: off).",
                       flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1: off).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
  flags.DEFINE_integer("batch_size", 16, "Inputs decoded together.", flag_values=fv)
  flags.DEFINE_string("out", None, "JSONL of answers (default for a folder or JSON: "
                      "WORKDIR/predictions.jsonl).", flag_values=fv)
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.", flag_values=fv)


def _check_flags(fv):
  """Checks that need no checkpoint; raises InferenceError naming the flag."""
  bad = inference.InferenceError
  if not fv.workdir:
    raise bad("--workdir is required")
  if fv.depth is not None and fv.depth < 1:
    raise bad(f"--depth={fv.depth} must be >= 1")
  if fv.adaptive is not None:
    if fv.depth is not None:
      raise bad("--depth and --adaptive exclude each other (adaptive exit recurses up to "
                "the trained R)")
    if fv.all_depths:
      raise bad("--all_depths and --adaptive exclude each other")
    if not 0 < fv.adaptive <= 1:
      raise bad(f"--adaptive={fv.adaptive} must be a probability threshold in (0, 1]")
    _adaptive(fv).check()  # the decoder's own checks (stable_steps), before loading
  if fv.stable_steps and fv.adaptive is None:
    raise bad(f"--stable_steps={fv.stable_steps}: only with --adaptive")
  if fv.max_new_tokens is not None and fv.max_new_tokens < 1:
    raise bad(f"--max_new_tokens={fv.max_new_tokens} must be >= 1 (it counts the eos)")
  _sampling(fv).check()
  if fv.batch_size < 1:
    raise bad(f"--batch_size={fv.batch_size} must be >= 1")
  if fv.step is not None and fv.step < 0:
    raise bad(f"--step={fv.step} must be >= 0")


def _sampling(fv):
  return decode.Sampling(temperature=fv.temperature, top_k=fv.top_k, top_p=fv.top_p)


def _adaptive(fv):
  return (None if fv.adaptive is None
          else decode.Adaptive(threshold=fv.adaptive, stable_steps=fv.stable_steps))


def _depths(fv, config):
  """The depths to decode at, checked against the trained model."""
  rec = config.model.recursion
  trained = int(rec.num_steps)
  if rec.mode == "none":
    if fv.depth not in (None, 1):
      raise inference.InferenceError(f"--depth={fv.depth}: a standard model (recursion "
                                     "mode 'none') has depth 1 only")
    if fv.adaptive is not None:
      raise inference.InferenceError("--adaptive needs a recursive model; this one has "
                                     "recursion mode 'none'")
  depth = fv.depth or trained
  return list(range(1, depth + 1)) if fv.all_depths else [depth]


def _out_path(fv, many):
  """Where the JSONL goes (None: print only); refuses to replace a file unasked."""
  if fv.out is None and not many:
    return None
  out = fv.out or os.path.join(fv.workdir, "predictions.jsonl")
  if os.path.exists(out) and not fv.overwrite:
    raise inference.InferenceError(f"--out={out} exists; pass --overwrite to replace it")
  if os.path.isdir(out):
    raise inference.InferenceError(f"--out={out} is a folder; name a .jsonl file")
  return out


def _chunks(n, size):
  for start in range(0, n, size):
    yield list(range(start, min(start + size, n)))


def _decode_all(fv, loaded, inputs, depths, max_new, width):
  """One row per input: its answer at every depth (and the steps used, if adaptive)."""
  tok = loaded.tokenizer
  sampling, adaptive = _sampling(fv), _adaptive(fv)
  rng = jax.random.PRNGKey(fv.seed)
  batch_size = min(fv.batch_size, len(inputs))
  rows = []
  for k, idx in enumerate(_chunks(len(inputs), batch_size)):
    # The last chunk is filled up with copies of its first input (never reported).
    filled = idx + [idx[0]] * (batch_size - len(idx))
    batch = inference.make_batch(loaded, [inputs[i][2] for i in filled],
                                 [inputs[i][1] for i in filled], max_new, pad_to=width)
    answers, steps = {}, None
    for depth in depths:
      gen = decode.generate(loaded.model, loaded.params, batch, depth=depth,
                            max_new_tokens=max_new, eos_id=tok.eos_id, sampling=sampling,
                            rng=jax.random.fold_in(rng, k), adaptive=adaptive)
      answers[depth] = [decode.answer_text(tok, row) for row in np.asarray(gen.tokens)]
      if adaptive is not None:
        steps = np.asarray(gen.steps_used)
    for j, i in enumerate(idx):
      name, image, prompt = inputs[i]
      row = {"id": name, "image": image, "prompt": prompt, "depth": depths[-1],
             "answer": answers[depths[-1]][j]}
      if fv.all_depths:
        row["answers_by_depth"] = {str(d): answers[d][j] for d in depths}
      if steps is not None:
        used = [int(s) for s in steps[j] if s > 0]
        row["steps_used"] = used
        row["mean_steps"] = float(np.mean(used)) if used else 0.0
      rows.append(row)
  return rows


def predict(fv):
  """Runs the CLI on parsed flags; returns the JSONL rows (also written or printed)."""
  _check_flags(fv)
  inputs = inference.read_inputs(fv.image, fv.prompt)
  many = fv.image is not None and (os.path.isdir(fv.image) or
                                    fv.image.endswith((".json", ".jsonl")))
  # Sliced once for every call below, and the stacked layout not kept beside it.
  loaded = inference.for_decoding(inference.load(fv.workdir, step=fv.step))
  depths = _depths(fv, loaded.config)
  out = _out_path(fv, many)
  tok = loaded.tokenizer

  # All prompts are checked before anything is decoded, and padded to one width so
  # that every batch has the same shapes (one compilation per depth).
  prompts = [p for _, _, p in inputs]
  longest = max(len(tok.encode(p)) for p in prompts)
  # Default: every position left in the trained text length (bos + prompt + answer).
  max_new = fv.max_new_tokens or max(1, loaded.seq_len - 1 - longest)
  width = inference.encode_prompts(loaded, prompts, max_new)["tokens"].shape[1]

  rows = _decode_all(fv, loaded, inputs, depths, max_new, width)

  mean_steps = None
  if fv.adaptive is not None:
    used = [s for r in rows for s in r["steps_used"]]
    mean_steps = float(np.mean(used)) if used else 0.0
  if not many:
    row = rows[0]
    for d in depths:
      print(f"r={d}: {row['answers_by_depth'][str(d)]}" if fv.all_depths else row["answer"])
  if mean_steps is not None and not many:
    print(f"mean steps per token: {mean_steps:.2f} (adaptive exit at p >= {fv.adaptive}, "
          f"up to R={depths[-1]})")
  if out is not None:
    _write_jsonl(out, rows)
    what = f"depths 1..{depths[-1]}" if fv.all_depths else f"depth {depths[-1]}"
    if mean_steps is not None:
      what = f"adaptive, up to depth {depths[-1]}, mean steps per token {mean_steps:.2f}"
    print(f"wrote {len(rows)} predictions to {out} ({what}; checkpoint step {loaded.step})")
  return rows


def _write_jsonl(path, rows):
  """Writes all rows or nothing: a run that fails midway leaves no partial file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def main(argv=None):
  """`argv` is the whole command line (program name first), flags included.

  Returns the JSONL rows; an input mistake prints one line and exits 2.
  """
  argv = sys.argv if argv is None else argv
  fv = flags.FlagValues()
  define_flags(fv)
  if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
    print(__doc__ + "\nflags:\n" + fv.get_help())
    return []
  # Library warnings (orbax metadata notes) would break the one-line error contract.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    rest = fv(argv)
    if len(rest) > 1:
      raise inference.InferenceError(f"unexpected arguments: {' '.join(rest[1:])}")
    return predict(fv)
  except (inference.InferenceError, ValueError, flags.Error) as e:
    # ValueError: config checks, and the decoder's checks of the sampling and exit flags.
    print(f"{_PROG}: error: " + " ".join(str(e).split()), file=sys.stderr)
    sys.exit(2)
  finally:
    logging.set_verbosity(verbosity)


def _app_main(argv):
  main(argv)


if __name__ == "__main__":
  app.run(_app_main, flags_parser=cli.program_name_only)
