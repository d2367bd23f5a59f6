"""LLaVA-format records: a JSON array or JSONL file of image + conversation records.

A record is
  {"image": "rel/path.jpg",            # optional: no image -> image_mask 0
   "conversations": [{"from": "human", "value": "<image>\\nQ1"},
                     {"from": "gpt", "value": "A1"}, ...]}
or {"image": ..., "question": "Q", "answer": "A"}. `<image>` placeholders are
stripped (the model prepends image tokens itself); "human"/"user" turns are
prompts, "gpt"/"assistant" turns answers, "system" turns are ignored, and every
answer turn is supervised.

Parsing happens once, eagerly, in the process that builds the source: problems are
counted there (see skips.py) or raised under strict with the file and line
(JSONL) or record index (JSON array). Images are only opened by the preprocessing.
"""
import json
import os

from rvlm.data import families
from rvlm.data import skips

_PROMPT_ROLES = ("human", "user")
_ANSWER_ROLES = ("gpt", "assistant")


def _read_records(path, strict):
  """Yields (where, record-or-None) for each record; None = unreadable (counted)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"cannot read LLaVA file {path}: {e}") from e
  if path.endswith(".jsonl") or not text.lstrip().startswith("["):
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        yield where, json.loads(line)
      except json.JSONDecodeError as e:
        skips.report("bad_json", where, str(e), strict)
        yield where, None
    return
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    # A broken JSON array cannot be resynchronised: no record is trustworthy.
    raise skips.BadInput(f"{path}:{e.lineno}: bad_json: {e.msg}") from e
  for k, rec in enumerate(records):
    yield f"{path}[record {k}]", rec


def _turns(rec):
  """(prompt, answer) pairs of a record, or raises ValueError('bad_record: ...')."""
  if "conversations" in rec:
    convs = rec["conversations"]
    if not isinstance(convs, list):
      raise ValueError("conversations is not a list")
    turns, prompt = [], None
    for t in convs:
      if not isinstance(t, dict) or not isinstance(t.get("value"), str):
        raise ValueError(f"turn {t!r} has no string 'value'")
      role = t.get("from", t.get("role"))
      if role == "system":
        continue
      if role in _PROMPT_ROLES:
        if prompt is not None:
          raise ValueError("two prompts without an answer between them")
        prompt = t["value"]
      elif role in _ANSWER_ROLES:
        if prompt is None:
          raise ValueError("an answer turn without a prompt before it")
        turns.append((prompt, t["value"]))
        prompt = None
      else:
        raise ValueError(f"unknown turn role {role!r}")
  elif "question" in rec and "answer" in rec:
    if not isinstance(rec["question"], str) or not isinstance(rec["answer"], str):
      raise ValueError("question/answer are not strings")
    turns = [(rec["question"], rec["answer"])]
  else:
    raise ValueError("neither 'conversations' nor 'question'/'answer'")
  if not turns:
    raise ValueError("no answer turn")
  return [(" ".join(q.replace("<image>", " ").split()), a.strip()) for q, a in turns]


class LlavaSource:
  """grain random-access source over the valid records of one LLaVA file.

  Records: image_path (absolute, or None), turns, family, hops (0: unknown),
  origin ("file:line"). The image is decoded by the preprocessing.
  """

  def __init__(self, json_path, image_dir, strict=False):
    if not json_path:
      raise ValueError("config.data.train_json / eval_json must name a LLaVA file")
    self._records = []
    family = families.ALL_FAMILIES.index(families.LLAVA_FAMILY)
    for where, rec in _read_records(json_path, strict):
      if rec is None:
        continue
      if not isinstance(rec, dict):
        skips.report("bad_record", where, "not a JSON object", strict)
        continue
      try:
        turns = _turns(rec)
      except ValueError as e:
        skips.report("bad_record", where, str(e), strict)
        continue
      if any(not a for _, a in turns):
        skips.report("empty_answer", where, "an answer turn is empty", strict)
        continue
      image = rec.get("image")
      path = None
      if image:
        if not isinstance(image, str):
          skips.report("bad_record", where, f"image {image!r} is not a path", strict)
          continue
        path = os.path.join(image_dir or "", image)
        if not os.path.isfile(path):
          skips.report("missing_image", where, f"no image file {path}", strict)
          continue
      self._records.append(dict(image_path=path, turns=tuple(turns), family=family,
                                hops=0, origin=where))
    if not self._records:
      raise ValueError(f"{json_path}: no usable records (skips: {skips.skip_counts()})")

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    return self._records[int(i)]

  def texts(self):
    for r in self._records:
      for q, a in r["turns"]:
        yield q
        yield a
