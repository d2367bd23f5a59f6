"""Free-running (generated) evaluation: greedy answers at each recursion depth, and at
the trained depth with adaptive exit, scored by exact match and token F1 against the
reference, with per-token latency and steps used. `python -m rvlm.evaluate` runs it.
Given the tokenizer, answers are also decoded to text and compared after VQA-style
normalisation (rvlm/answers.py), so that "Yes." scores as "yes".

Teacher-forced exact match (rvlm/evaluate.py) feeds the reference answer back in; here
the model reads its own tokens, so a wrong first token cannot be rescued and an answer
that runs on past the reference is wrong. For one-token answers the two agree exactly
(greedy token 1 right means token 2 is predicted from the same prefix).
"""
import collections
import time

import numpy as np

from rvlm import answers as answers_lib
from rvlm import decode
from rvlm import inference


_TEXT = ("tokens", "input_mask", "mask_ar", "mask_loss")


def cut_prompt(example, eos_id):
  """(prompt, reference) token lists of one laid-out example (rvlm/data/layout.py).

  The prompt is [bos] + question: the real tokens of the prefix (mask_ar == 0). The
  reference is the supervised run from the first mask_loss == 1 token up to, not
  including, its eos; later turns of a multi-turn record belong to neither.
  """
  tokens = np.asarray(example["tokens"])
  real = np.asarray(example["input_mask"]) > 0
  prompt = tokens[(np.asarray(example["mask_ar"]) == 0) & real]
  supervised = tokens[np.asarray(example["mask_loss"]) > 0]
  ends = np.flatnonzero(supervised == eos_id)
  reference = supervised[:ends[0]] if ends.size else supervised
  return [int(t) for t in prompt], [int(t) for t in reference]


def _rows(batch):
  """Each row's text arrays, and whether it is a real example (not batch padding)."""
  for i in range(batch["tokens"].shape[0]):
    yield {k: batch[k][i] for k in _TEXT}, bool(batch["example_mask"][i] > 0)


def references(batches, eos_id):
  """The reference answers of the real examples, in batch order."""
  return [cut_prompt(ex, eos_id)[1] for b in batches for ex, real in _rows(b) if real]


def prompt_batch(batch, length, eos_id):
  """The decode batch of a laid-out eval batch: prompts right-padded to `length`.

  Padding rows (example_mask 0) get the first real row's prompt and image: an
  all-masked row would attend over nothing, and those rows are never scored.
  """
  rows = list(_rows(batch))
  first = next((i for i, (_, real) in enumerate(rows) if real), 0)
  src = [i if real else first for i, (_, real) in enumerate(rows)]
  tokens, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
  for i, j in enumerate(src):
    prompt, _ = cut_prompt(rows[j][0], eos_id)
    if len(prompt) > length:
      raise ValueError(f"a prompt of {len(prompt)} tokens does not fit length={length}")
    tokens[i, :len(prompt)], mask[i, :len(prompt)] = prompt, 1
  return {"image": np.asarray(batch["image"], np.float32)[src],
          "image_mask": np.asarray(batch["image_mask"], np.int32)[src],
          "tokens": tokens, "input_mask": mask}


def max_prompt_length(batches):
  return max(int(((b["mask_ar"] == 0) & (b["input_mask"] > 0)).sum(1).max()) for b in batches)


def token_f1(pred, ref):
  """SQuAD-style bag-of-tokens F1; two empty answers agree (1.0)."""
  if not pred or not ref:
    return float(not pred and not ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if not same:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def exact_match(pred, ref, ended=True):
  """The answer tokens equal the reference and generation stopped there (eos)."""
  return bool(ended) and list(pred) == list(ref)


def generated_answers(tokens, lengths, eos_id):
  """(answers, ended): tokens before eos per row, and whether eos was generated."""
  answers, ended = [], []
  for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
    n = int(n)
    answers.append([int(t) for t in row[:n]])
    ended.append(n < row.shape[0] and int(row[n]) == eos_id)
  return answers, ended


def run(loaded, batches, *, depth, max_new_tokens, adaptive=None):
  """Greedy generation over `batches` at `depth`; one warm-up (compile) call on the
  first batch is excluded from timing.

  Returns {'answers', 'ended', 'steps_used' (list of per-row arrays over generated
  tokens), 'wall_s'} for the real rows (example_mask 1), in batch order.
  """
  eos = loaded.tokenizer.eos_id
  length = max_prompt_length(batches)
  gen = lambda b: decode.generate(  # noqa: E731
      loaded.model, loaded.params, prompt_batch(b, length, eos), depth=depth,
      max_new_tokens=max_new_tokens, eos_id=eos, adaptive=adaptive)
  gen(batches[0])
  answers, ended, steps, wall = [], [], [], 0.0
  for b in batches:
    # generate returns host arrays, so the clock stops when the tokens are there.
    t0 = time.perf_counter()
    out = gen(b)
    wall += time.perf_counter() - t0
    real = np.asarray(b["example_mask"]) > 0
    a, e = generated_answers(np.asarray(out.tokens)[real], np.asarray(out.lengths)[real], eos)
    answers += a
    ended += e
    steps += [row[row > 0] for row in np.asarray(out.steps_used)[real]]
  return {"answers": answers, "ended": ended, "steps_used": steps, "wall_s": wall}


def score(gen, refs, families, hops, family_names, tokenizer=None):
  """Exact match and F1 overall, by family and by hop count, plus speed and steps.

  With `tokenizer`, answers and references are decoded to text, and each part also
  has 'normalised_exact_match' (equal after rvlm.answers.normalise, and ended with
  eos as for the strict figure), and the result 'normalised_majority_baseline': the
  split's, the same at every depth, so that a caller holding one score has it.
  Identical tokens decode to identical text, so normalised >= strict, per example.
  The text is what rvlm.predict prints: decode drops special tokens (and the embedded
  word tokenizer's <unk>), so answers that differ only in those match.
  """
  em = np.array([exact_match(a, r, e) for a, r, e in zip(gen["answers"], refs, gen["ended"])])
  f1 = np.array([token_f1(a, r) for a, r in zip(gen["answers"], refs)])
  families, hops = np.asarray(families), np.asarray(hops)
  if tokenizer is not None:
    ref_text = [tokenizer.decode(r) for r in refs]
    norm = np.array([bool(e) and answers_lib.normalised_match(tokenizer.decode(a), t)
                     for a, t, e in zip(gen["answers"], ref_text, gen["ended"])], bool)
  def part(sel):
    out = {"exact_match": float(em[sel].mean()), "f1": float(f1[sel].mean()),
           "num_examples": int(np.sum(sel))}
    if tokenizer is not None:
      out["normalised_exact_match"] = float(norm[sel].mean())
    return out
  tokens = sum(s.size for s in gen["steps_used"])
  steps = float(sum(s.sum() for s in gen["steps_used"]) / max(tokens, 1))
  result = {
      **part(np.ones(em.shape, bool)),
      "by_family": {family_names[f]: part(families == f) for f in np.unique(families)},
      "by_hops": {str(h): part(hops == h) for h in np.unique(hops)},
      "generated_tokens": int(tokens),
      "wall_s": gen["wall_s"],
      # Batch-amortised: the wall time of generate (prefill included) over every
      # token it produced, eos included.
      "ms_per_token": 1e3 * gen["wall_s"] / max(tokens, 1),
      "tokens_per_s": tokens / gen["wall_s"] if gen["wall_s"] else float("nan"),
      "mean_steps_per_token": steps,
  }
  if tokenizer is not None:
    result["normalised_majority_baseline"] = answers_lib.majority_baseline(ref_text)
  return result


def evaluate(loaded, batches, *, depths, thresholds, max_new_tokens, family_names):
  """Scores greedy generation at each depth and, at the trained depth R, with
  adaptive exit at each threshold. Returns {'by_depth', 'adaptive',
  'normalised_majority_baseline', ...}; every score has the normalised figures."""
  eos = loaded.tokenizer.eos_id
  # The decoding layout once for every depth, threshold and batch below (decode.generate
  # would otherwise slice the params on each call).
  loaded = inference.for_decoding(loaded)
  refs = references(batches, eos)
  families = np.concatenate([b["family"][b["example_mask"] > 0] for b in batches])
  hops = np.concatenate([b["hops"][b["example_mask"] > 0] for b in batches])
  trained = int(loaded.config.model.recursion.num_steps)
  result = {"num_examples": len(refs), "trained_depth": trained,
            "max_new_tokens": int(max_new_tokens), "by_depth": {}, "adaptive": {},
            "normalised_majority_baseline": answers_lib.majority_baseline(
                [loaded.tokenizer.decode(r) for r in refs])}
  for r in depths:
    gen = run(loaded, batches, depth=int(r), max_new_tokens=max_new_tokens)
    result["by_depth"][str(r)] = score(gen, refs, families, hops, family_names,
                                       tokenizer=loaded.tokenizer)
  for t in thresholds:
    gen = run(loaded, batches, depth=trained, max_new_tokens=max_new_tokens,
              adaptive=decode.Adaptive(float(t)))
    res = score(gen, refs, families, hops, family_names, tokenizer=loaded.tokenizer)
    res["steps_fraction_of_trained"] = res["mean_steps_per_token"] / trained
    result["adaptive"][format_threshold(t)] = res
  return result


def format_threshold(t):
  return f"{float(t):g}"


def default_max_new_tokens(batches, eos_id):
  """The longest reference answer plus its eos: enough for every exact match. A longer
  spelling of a right answer ("the circle" for "circle") can be cut off by it and
  scored wrong by the normalised match too; pass --max_new_tokens to allow it."""
  return 1 + max(len(r) for r in references(batches, eos_id))
