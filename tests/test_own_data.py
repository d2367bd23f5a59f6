"""Own data at practical speed: bucket lengths (rvlm/data/buckets.py) and the tokenizer
and text length settled from the data (rvlm/data/resolve.py), end to end with resume."""
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from configs import debug
from configs import llava_format
from rvlm import data
from rvlm import steps
from rvlm import train
from rvlm.data import buckets
from rvlm.data import resolve
from rvlm.models import vlm

QUESTIONS = ["what colour is it?", "is there a cat?", "how many dogs?", "what shape?",
             "where is the ball?", "is it big?"]
ANSWERS = ["red", "yes", "two", "circle", "left", "no"]


def write_dataset(tmp_path, n=48, long_every=0):
  """n short VQA records (one long one every `long_every`) over 4 small PNGs."""
  img = tmp_path / "images"
  img.mkdir(exist_ok=True)
  for k in range(4):
    Image.new("RGB", (12 + k, 10), (60 * k, 255 - 60 * k, 90)).save(img / f"{k}.png")
  path = tmp_path / "train.jsonl"
  with open(path, "w") as f:
    for i in range(n):
      q = QUESTIONS[i % len(QUESTIONS)]
      if long_every and i % long_every == long_every - 1:
        q = " ".join([q] * 6)
      rec = {"image": f"{i % 4}.png", "question": q, "answer": ANSWERS[i % len(ANSWERS)]}
      f.write(json.dumps(rec) + "\n")
  return path


def own_config(tmp_path, path, **data_overrides):
  c = llava_format.get_config()
  d = debug.get_config()
  c.model = d.model            # the debug model size: seconds per step
  c.optim, c.train = d.optim, d.train
  c.data.update(train_json=str(path), eval_json=str(path), image_dir=str(tmp_path / "images"),
                batch_size=8)
  c.data.tokenizer.auto_vocab_size = 64
  c.data.update(data_overrides)
  c.eval.update(batch_size=16, num_examples=16, generated=False)
  return c


# ---- bucket lengths ---------------------------------------------------------------------


def test_boundaries():
  cfg = lambda b, n=100: llava_format.get_config().data.copy_and_resolve_references()  # noqa: E731
  d = cfg(None)
  d.seq_len = 100
  for spec, want in [("none", ()), ("auto", (16, 32, 64, 100)), ("40, 16", (16, 40, 100)),
                     ("100", (100,))]:
    d.buckets = spec
    assert buckets.boundaries(d) == want
  for bad in ("16,200", "x", "0"):
    d.buckets = bad
    with pytest.raises(ValueError, match="config.data.buckets"):
      buckets.boundaries(d)


def test_trim_cuts_only_padding():
  mask = np.zeros((3, 10), np.int32)
  mask[0, :3], mask[1, :5], mask[2, :2] = 1, 1, 1
  batch = {"tokens": mask * 7, "input_mask": mask, "mask_ar": mask, "mask_loss": mask,
           "image": np.ones((3, 2, 2, 3))}
  assert buckets.needed_length(batch) == 5
  assert buckets.bucket_length(5, (4, 8, 10)) == 8
  assert buckets.bucket_length(11, (4, 8, 10)) == 10
  cut = buckets.trim(batch, 8)
  assert cut["tokens"].shape == (3, 8) and cut["image"].shape == batch["image"].shape
  np.testing.assert_array_equal(cut["input_mask"], mask[:, :8])
  with pytest.raises(ValueError, match="needs 5"):
    buckets.trim(batch, 4)


def test_cut_batch_gives_the_same_losses(tmp_path):
  """Cutting padding changes nothing the model computes: per-step losses agree."""
  path = write_dataset(tmp_path, n=16)
  c = own_config(tmp_path, path, tokenizer=dict(kind="bytes", path="", bos="", eos="",
                                                pad="", auto_vocab_size=64),
                 seq_len=64, buckets="none")
  c.model.vocab_size = 260
  full = data.build_eval_batches(c, "val", 16, 16)[0]
  cut = buckets.trim(full, buckets.bucket_length(buckets.needed_length(full), (32, 64)))
  assert cut["tokens"].shape[1] == 32 < full["tokens"].shape[1]
  model = vlm.make_model(c.model)
  params = model.init(jax.random.PRNGKey(0), train.dummy_batch(c, 1))["params"]
  strip = lambda b: {k: v for k, v in b.items() if k not in ("family", "hops", "example_mask")}  # noqa: E731
  loss_full, correct_full, _ = steps.forward_losses(model, params, strip(full))
  loss_cut, correct_cut, _ = steps.forward_losses(model, params, strip(cut))
  # The supervised positions (token t predicted at t - 1) all lie inside the cut.
  sup = cut["mask_loss"][:, 1:] > 0
  assert sup.sum() == (full["mask_loss"][:, 1:] > 0).sum() > 0
  n = cut["tokens"].shape[1] - 1
  np.testing.assert_allclose(np.asarray(loss_cut)[:, sup], np.asarray(loss_full)[:, :, :n][:, sup],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(correct_cut)[:, sup],
                                np.asarray(correct_full)[:, :, :n][:, sup])


def test_eval_batches_are_cut_alike_in_every_process(tmp_path):
  path = write_dataset(tmp_path, n=32, long_every=16)
  c = own_config(tmp_path, path, tokenizer=dict(kind="bytes", path="", bos="", eos="",
                                                pad="", auto_vocab_size=64),
                 seq_len=256, buckets="auto")
  c.model.vocab_size = 260
  shapes = [[b["tokens"].shape for b in data.build_eval_batches(c, "val", 16, 32, p, 2)]
            for p in (0, 1)]
  assert shapes[0] == shapes[1]
  lengths = [s[1] for s in shapes[0]]
  assert set(lengths) <= set(buckets.boundaries(c.data)) and max(lengths) < 256


# ---- settled from the data --------------------------------------------------------------


def test_resolve_trains_the_tokenizer_and_measures_the_length_once(tmp_path):
  path = write_dataset(tmp_path, n=48, long_every=12)
  c = own_config(tmp_path, path)
  workdir = str(tmp_path / "w")
  r = resolve.resolve(c, workdir)
  assert c.data.tokenizer.kind == "auto" and c.data.seq_len == 0  # the input is untouched
  model_file = os.path.join(workdir, resolve.TOKENIZER_FILE)
  assert r.data.tokenizer.kind == "sentencepiece" and r.data.tokenizer.path == model_file
  tok = data.get_tokenizer(r.data)
  assert r.model.vocab_size == tok.vocab_size <= 64
  longest = max(resolve.text_lengths(r))
  assert r.data.seq_len == -(-longest // 8) * 8
  data.pipeline.validate(r)
  # Reused, not recomputed: same file, same stats.
  mtime = os.path.getmtime(model_file)
  with open(os.path.join(workdir, resolve.STATS_FILE)) as f:
    stats = json.load(f)
  again = resolve.resolve(c, workdir)
  assert os.path.getmtime(model_file) == mtime and again.data.seq_len == r.data.seq_len
  assert stats["records"] == 48 and stats["longest"] == longest
  # Elsewhere than the trainer, 'auto' and 0 are errors that say what to do.
  with pytest.raises(ValueError, match="settled by the trainer"):
    data.get_tokenizer(c.data)
  c2 = r.copy_and_resolve_references()
  c2.data.seq_len = 0
  with pytest.raises(ValueError, match="seq_len=0"):
    data.pipeline.validate(c2)


def test_own_data_trains_with_buckets_and_resumes_exactly(tmp_path):
  """The llava_format defaults end to end (auto tokenizer, auto length, buckets): a run
  resumed from its step-3 checkpoint logs the same step-6 loss as the run itself."""
  import shutil  # pylint: disable=g-import-not-at-top
  path = write_dataset(tmp_path, n=48, long_every=8)
  c = own_config(tmp_path, path)
  c.optim.warmup_steps = 2
  c.train.update(total_steps=6, log_every=3, checkpoint_every=3, eval_every=1000)
  workdir = str(tmp_path / "w")
  res = train.train_and_evaluate(c, workdir)
  assert res["accuracy_by_depth"]
  first = {r["step"]: r["loss"] for r in data_rows(workdir)}
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  train.train_and_evaluate(c, workdir)   # resumes at step 3, reusing tokenizer and length
  again = {r["step"]: r["loss"] for r in data_rows(workdir)}  # the last row per step
  assert sorted(first) == [3, 6] and again[6] == first[6]
  with open(os.path.join(workdir, "hparams.json")) as f:
    hp = json.load(f)
  assert hp["data/tokenizer/kind"] == "sentencepiece" and 0 < hp["data/seq_len"] <= 64


def data_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def test_readme_command_on_own_data(tmp_path):
  """`python -m rvlm.main --config=configs/llava_format.py` as the README gives it: the
  tokenizer and length are fitted in the workdir, logged, and the run finishes."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = write_dataset(tmp_path, n=32)
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "rvlm.main", "--config=configs/llava_format.py:preset=tiny",
         f"--workdir={workdir}", f"--config.data.train_json={path}",
         f"--config.data.eval_json={path}", f"--config.data.image_dir={tmp_path / 'images'}",
         "--config.data.batch_size=8", "--config.train.total_steps=2",
         "--config.train.log_every=1", "--config.optim.warmup_steps=1",
         "--config.eval.num_examples=16", "--config.eval.batch_size=16"]
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "tokenizer.kind='auto': training a sentencepiece model" in out.stderr
  assert "seq_len=0 (auto)" in out.stderr
  assert (workdir / "tokenizer" / "sp.model").exists()
  with open(workdir / "results.json") as f:
    results = json.load(f)
  assert set(results["normalised_exact_match_by_depth"]) == set(results["accuracy_by_depth"])
