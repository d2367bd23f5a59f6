"""LLaVA-format loading: tokens and masks, multi-turn, image-less, bad input policy."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import llava_format
from rvlm import data
from rvlm.data import skips

SEQ = 64


def _config(tmp_path, train, evaluation=None, **data_overrides):
  c = llava_format.get_config()
  c.data.train_json = str(train)
  c.data.eval_json = str(evaluation or train)
  c.data.image_dir = str(tmp_path / "images")
  c.data.seq_len = SEQ
  c.data.buckets = "none"
  c.data.tokenizer.kind = "bytes"  # ids the tests can write by hand (_ids)
  c.model.vocab_size = 260
  c.data.batch_size = 2
  for k, v in data_overrides.items():
    c.data[k] = v
  return c


def _images(tmp_path):
  d = tmp_path / "images"
  os.makedirs(d / "sub", exist_ok=True)
  Image.new("RGB", (20, 10), (255, 0, 0)).save(d / "red.png")
  Image.new("L", (8, 8), 0).save(d / "sub" / "black.jpg")
  (d / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
  return d


def _ids(text):
  return [b + 4 for b in text.encode()]


@pytest.fixture(autouse=True)
def _reset_counts():
  skips.reset_skip_counts()


def test_records_become_the_documented_tokens_and_masks(tmp_path):
  _images(tmp_path)
  records = [
      {"image": "red.png", "conversations": [
          {"from": "human", "value": "<image>\nWhat colour?"},
          {"from": "gpt", "value": "Red."},
          {"from": "human", "value": "Sure?"},
          {"from": "gpt", "value": "Yes"}]},
      {"question": "Say hi", "answer": "hi"},                        # no image
      {"image": "sub/black.jpg", "conversations": [
          {"from": "system", "value": "be brief"},
          {"from": "human", "value": "Shade? <image>"},
          {"from": "gpt", "value": "dark"}]},
  ]
  path = tmp_path / "train.json"
  path.write_text(json.dumps(records))
  c = _config(tmp_path, path)
  b = data.build_eval_batches(c, "val", batch_size=4, num_examples=10)[0]
  assert b["example_mask"].tolist() == [1, 1, 1, 0]
  assert b["image_mask"].tolist() == [1, 0, 1, 0]
  assert b["family"].tolist()[:3] == [data.family_names(c).index("llava")] * 3
  # Image: resized to the model size, normalised; image-less records get zeros.
  assert b["image"].shape == (4, 32, 32, 3)
  np.testing.assert_allclose(b["image"][0, ..., 0], 1.0)
  np.testing.assert_allclose(b["image"][0, ..., 1:], -1.0)
  np.testing.assert_allclose(b["image"][2], -1.0)
  assert not b["image"][1].any()

  bos, eos = 1, 2
  q1, a1, q2, a2 = _ids("What colour?"), _ids("Red."), _ids("Sure?"), _ids("Yes")
  want = [bos] + q1 + a1 + [eos] + q2 + a2 + [eos]
  n = len(want)
  assert b["tokens"][0].tolist() == want + [0] * (SEQ - n)
  assert b["input_mask"][0].tolist() == [1] * n + [0] * (SEQ - n)
  # Prefix: bos + first prompt only; every answer + eos is supervised.
  assert b["mask_ar"][0].tolist() == [0] * (1 + len(q1)) + [1] * (SEQ - 1 - len(q1))
  loss = [0] * (1 + len(q1)) + [1] * (len(a1) + 1) + [0] * len(q2) + [1] * (len(a2) + 1)
  assert b["mask_loss"][0].tolist() == loss + [0] * (SEQ - n)
  # Single-turn question/answer record; `<image>` stripped wherever it stands.
  assert b["tokens"][1, :10].tolist() == [bos] + _ids("Say hi") + _ids("hi") + [eos]
  assert b["tokens"][2, :8].tolist() == [bos] + _ids("Shade?") + [_ids("d")[0]]
  assert skips.skip_counts() == {r: 0 for r in skips.REASONS}


def _bad_lines(tmp_path):
  long_q = " ".join(["word"] * 40)
  return {
      "missing_image": {"image": "nope.png", "question": "q", "answer": "a"},
      "corrupt_image": {"image": "junk.png", "question": "q", "answer": "a"},
      "bad_json": "{this is not json",
      "empty_answer": {"conversations": [{"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "  "}]},
      "too_long": {"question": long_q, "answer": "a"},
  }


def _write_jsonl(path, lines):
  good = {"image": "red.png", "question": "colour?", "answer": "red"}
  with open(path, "w") as f:
    for line in [good] + list(lines):
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def test_bad_input_is_skipped_and_counted_per_reason(tmp_path):
  _images(tmp_path)
  path = tmp_path / "bad.jsonl"
  turns = [{"from": r, "value": v} for r, v in
           [("human", "q1"), ("gpt", "a1"), ("human", " ".join(["w"] * 30)), ("gpt", "a2")]]
  _write_jsonl(path, list(_bad_lines(tmp_path).values()) + [{"conversations": turns}])
  c = _config(tmp_path, path, seq_len=24)
  c.data.seq_len = 24
  batches = data.build_eval_batches(c, "val", batch_size=4, num_examples=100)
  counts = data.skip_counts()
  assert counts == dict(bad_json=1, bad_record=0, empty_answer=1, missing_image=1,
                        corrupt_image=1, too_long=1, truncated_turns=1)
  # Kept: the good record and the multi-turn one cut to its first turn.
  assert [int(b["example_mask"].sum()) for b in batches] == [2]
  kept = batches[0]["tokens"][1]
  assert kept[:7].tolist() == [1] + _ids("q1") + _ids("a1") + [2, 0]

  # Training: bad rows never reach a batch, and the counts are the same with 0 or 2
  # workers (counted in the main process, once per row passed over).
  per_workers = []
  for workers in (0, 2):
    skips.reset_skip_counts()
    c.data.num_workers = workers
    it = data.build_train_iterator(c)
    for _ in range(4):
      b = next(it)
      assert b["input_mask"].sum(1).min() > 0
      assert set(b["tokens"][:, 1].tolist()) <= {_ids("colour?")[0], _ids("q1")[0]}
    it.close()
    per_workers.append(data.skip_counts())
  assert per_workers[0] == per_workers[1]
  counts = per_workers[0]
  # 8 kept rows = 4 epochs of the 4 loaded records (2 kept, 2 bad in each); the
  # last epoch's bad rows may lie after the last kept row.
  assert 3 <= counts["corrupt_image"] <= 4 and 3 <= counts["too_long"] <= 4
  assert counts["bad_json"] == counts["missing_image"] == counts["empty_answer"] == 1


@pytest.mark.parametrize("reason", list(_bad_lines(None)))
def test_strict_raises_naming_file_and_line(tmp_path, reason):
  _images(tmp_path)
  path = tmp_path / f"{reason}.jsonl"
  _write_jsonl(path, [_bad_lines(tmp_path)[reason]])
  c = _config(tmp_path, path, strict=True, seq_len=24)
  with pytest.raises(ValueError, match=f"{path}:2: {reason}"):
    data.build_eval_batches(c, "val", batch_size=2, num_examples=10)


def test_broken_json_array_names_file_and_line(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('[\n {"question": "q", "answer": "a"},\n {oops}\n]')
  c = _config(tmp_path, path)
  with pytest.raises(ValueError, match=f"{path}:3"):
    data.build_eval_batches(c, "val", batch_size=2, num_examples=10)


def test_llava_format_config_trains_from_command_line_overrides(tmp_path):
  _images(tmp_path)
  path = tmp_path / "t.jsonl"
  _write_jsonl(path, [{"question": "again?", "answer": "yes"}])
  # The config's own tokenizer and length (auto) are settled by the trainer in its
  # workdir (tests/test_own_data.py); here the byte tokenizer at 256 positions.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = [__file__, f"--config={root}/configs/llava_format.py",
          f"--config.data.train_json={path}", f"--config.data.eval_json={path}",
          f"--config.data.image_dir={tmp_path / 'images'}", "--config.data.batch_size=4",
          "--config.data.tokenizer.kind=bytes", "--config.data.seq_len=256",
          "--config.model.vocab_size=260"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=argv)
  fv(argv)
  c = fv.config
  it = data.build_train_iterator(c)
  b = next(it)
  it.close()
  assert b["tokens"].shape == (4, 256) and sorted(b["image_mask"].tolist()) == [0, 0, 1, 1]
  assert data.get_tokenizer(c.data).vocab_size <= c.model.vocab_size
