"""python -m rvlm.predict and rvlm.inference on the session's trained debug workdir.

Most runs are in-process (`predict.main(argv)`, SystemExit for errors): a subprocess
spends seconds importing jax. Three subprocesses check what only a real process shows:
the exit code, and that stderr holds one line and no traceback.
"""
import gc
import json
import os
import shutil
import subprocess
import sys
import types
import weakref

import jax
import numpy as np
import pytest
from PIL import Image

from rvlm import decode
from rvlm import inference
from rvlm import predict
from rvlm.data import tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "what colour is the square ?"
R = 2  # configs/debug.py: model.recursion.num_steps


@pytest.fixture(scope="module")
def loaded(trained_workdir):
  return inference.load(trained_workdir)


def _png(path, seed=0, size=(40, 48)):
  """A random RGB PNG (any picture will do; resized to the model's image size)."""
  pixels = np.random.RandomState(seed).randint(0, 256, size + (3,), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return str(path)


def _run(capsys, *args):
  """predict.main in-process: (rows, stdout lines)."""
  rows = predict.main(["predict", *args])
  return rows, capsys.readouterr().out.splitlines()


def _fail(capsys, *args):
  """The one stderr line of a run that must exit 2."""
  with pytest.raises(SystemExit) as e:
    predict.main(["predict", *args])
  assert e.value.code == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("rvlm.predict: error: ")
  return err[0]


def _expected(loaded, prompts, images, depth):
  """Greedy answers straight from decode.generate: what the CLI must print."""
  longest = max(len(loaded.tokenizer.encode(p)) for p in prompts)
  max_new = loaded.seq_len - 1 - longest
  batch = inference.make_batch(loaded, prompts, images, max_new)
  gen = decode.generate(loaded.model, loaded.params, batch, depth=depth,
                        max_new_tokens=max_new, eos_id=loaded.tokenizer.eos_id)
  return [decode.answer_text(loaded.tokenizer, row) for row in np.asarray(gen.tokens)]


def _words_ok(answer):
  vocab = set(tokenizers.WordTokenizer().words())
  return all(w in vocab for w in answer.split())


# ---- inference helpers ---------------------------------------------------------------

def test_encode_prompts_and_batch(loaded, tmp_path):
  tok = loaded.tokenizer
  batch = inference.make_batch(loaded, [PROMPT, "what shape ?"], [_png(tmp_path / "a.png"), None],
                               max_new_tokens=4)
  n = len(tok.encode(PROMPT))
  assert batch["tokens"].shape == (2, n + 1) and batch["tokens"].dtype == np.int32
  assert batch["tokens"][0].tolist() == [tok.bos_id] + tok.encode(PROMPT)
  assert batch["input_mask"].sum(1).tolist() == [n + 1, 4]
  assert batch["tokens"][1, 4:].tolist() == [0] * (n - 3)  # right-padded with 0
  s = loaded.config.model.vit.image_size
  assert batch["image"].shape == (2, s, s, 3) and batch["image"].dtype == np.float32
  assert batch["image_mask"].tolist() == [1, 0]
  assert -1 <= batch["image"][0].min() < batch["image"][0].max() <= 1
  assert not batch["image"][1].any()  # no image: zeros


def test_for_decoding_releases_the_stacked_weights(trained_workdir, tmp_path):
  """inference.for_decoding: the same answers as the stacked params, and once the name
  is rebound no stacked decoder weight stays alive beside its per-layer slices."""
  fresh = inference.load(trained_workdir)
  stack = fresh.params["recursion"]["step"]["stack"]
  refs = [weakref.ref(x) for x in jax.tree.leaves(stack)]
  prompts, images = [PROMPT, "what shape ?"], [_png(tmp_path / "a.png"), None]
  before = _expected(fresh, prompts, images, depth=R)
  stack = None
  fresh = inference.for_decoding(fresh)
  gc.collect()
  assert "layer_0" in fresh.params["recursion"]["step"]["stack"]
  assert all(r() is None for r in refs)
  assert _expected(fresh, prompts, images, depth=R) == before


def test_read_inputs(tmp_path):
  folder = tmp_path / "imgs"
  folder.mkdir()
  for name in ("b.png", "a.JPG", "c.txt"):
    (folder / name).write_bytes(b"x")
  assert inference.read_inputs(str(folder), "q ?") == [
      ("a.JPG", str(folder / "a.JPG"), "q ?"), ("b.png", str(folder / "b.png"), "q ?")]
  records = tmp_path / "r.jsonl"
  records.write_text(
      json.dumps({"id": "x", "image": "imgs/b.png", "conversations": [
          {"from": "human", "value": "<image>\nwhat  shape ?"}, {"from": "gpt", "value": "a"}]})
      + "\n" + json.dumps({"question": "yes ?"}) + "\n")
  assert inference.read_inputs(str(records), None) == [
      ("x", str(folder / "b.png"), "what shape ?"), ("1", None, "yes ?")]
  with pytest.raises(inference.InferenceError, match="--prompt is required"):
    inference.read_inputs(str(folder), None)


# ---- answers ------------------------------------------------------------------------
# decode compiles one program per (batch shape, depth, adaptive): the tests below share
# B = 1 (depths 1 and 2, also in the CLI subprocess through the persistent cache) and
# B = 2 with the same prompt width (depth 2, and adaptive).

def test_one_image_all_depths(loaded, trained_workdir, tmp_path, capsys):
  image = _png(tmp_path / "scene.png")
  rows, out = _run(capsys, f"--workdir={trained_workdir}", f"--image={image}",
                   f"--prompt={PROMPT}", "--all_depths")
  want = [_expected(loaded, [PROMPT], [image], depth=r)[0] for r in (1, 2)]
  assert out == [f"r=1: {want[0]}", f"r=2: {want[1]}"]  # one line per depth 1..R
  assert rows[0]["answers_by_depth"] == {"1": want[0], "2": want[1]}
  assert rows[0]["answer"] == want[1] and rows[0]["depth"] == R
  assert all(_words_ok(a) for a in want)
  assert not os.path.exists(os.path.join(trained_workdir, "predictions.jsonl"))


def test_depths(loaded):
  def depths(config=loaded.config, **kw):
    fv = types.SimpleNamespace(**dict(dict(depth=None, adaptive=None, all_depths=False), **kw))
    return predict._depths(fv, config)  # pylint: disable=protected-access
  assert depths() == [R]
  assert depths(depth=3) == [3]  # beyond the trained R: extrapolation, allowed
  assert depths(depth=3, all_depths=True) == [1, 2, 3]
  standard = loaded.config.copy_and_resolve_references()
  standard.model.recursion.update(mode="none", num_steps=1)
  assert depths(standard, all_depths=True) == [1]
  with pytest.raises(inference.InferenceError, match="depth 1 only"):
    depths(standard, depth=2)


def test_folder_writes_jsonl_and_refuses_overwrite(loaded, trained_workdir, tmp_path, capsys):
  workdir = str(tmp_path / "w")  # a copy: the default --out lands in the workdir
  shutil.copytree(trained_workdir, workdir)
  folder = tmp_path / "imgs"
  folder.mkdir()
  names = ["c.png", "a.png", "b.png"]
  for k, name in enumerate(names):
    _png(folder / name, seed=k, size=(20 + 10 * k, 32))
  (folder / "readme.txt").write_text("not an image")
  args = [f"--workdir={workdir}", f"--image={folder}", f"--prompt={PROMPT}", "--batch_size=2"]
  _, out = _run(capsys, *args)
  path = os.path.join(workdir, "predictions.jsonl")
  assert out == [f"wrote 3 predictions to {path} (depth {R}; checkpoint step 10)"]
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert [r["id"] for r in rows] == sorted(names)
  assert [r["image"] for r in rows] == [str(folder / n) for n in sorted(names)]
  assert all(r["prompt"] == PROMPT and r["depth"] == R for r in rows)
  # Each row is its own image's answer, also in the last batch (filled up to 2 rows).
  assert [r["answer"] for r in rows] == [
      _expected(loaded, [PROMPT], [str(folder / n)], depth=R)[0] for n in sorted(names)]

  before = open(path).read()
  err = _fail(capsys, *args)
  assert path in err and "--overwrite" in err
  assert open(path).read() == before
  _run(capsys, *args, "--overwrite")
  assert os.path.isfile(path) and not os.path.exists(path + ".tmp")


def test_llava_json_adaptive(loaded, trained_workdir, tmp_path, capsys):
  (tmp_path / "imgs").mkdir()
  _png(tmp_path / "imgs" / "s.png")
  records = [
      {"id": "q1", "image": "imgs/s.png", "conversations": [
          {"from": "human", "value": f"<image>\n{PROMPT}"}, {"from": "gpt", "value": "red"}]},
      {"id": "q2", "conversations": [{"from": "human", "value": "what shape ?"}]},
  ]
  path = tmp_path / "records.json"
  path.write_text(json.dumps(records))
  out_path = str(tmp_path / "answers.jsonl")
  rows, out = _run(capsys, f"--workdir={trained_workdir}", f"--image={path}",
                   f"--out={out_path}", "--adaptive=0.5")
  with open(out_path) as f:
    assert [json.loads(line) for line in f] == rows
  assert [r["id"] for r in rows] == ["q1", "q2"]
  assert rows[0]["image"] == str(tmp_path / "imgs" / "s.png") and rows[1]["image"] is None
  assert [r["prompt"] for r in rows] == [PROMPT, "what shape ?"]
  max_new = loaded.seq_len - 1 - len(loaded.tokenizer.encode(PROMPT))
  used = []
  for r in rows:  # one entry per generated token, eos included, each 1..R
    assert 1 <= len(r["steps_used"]) <= max_new and all(1 <= s <= R for s in r["steps_used"])
    assert r["mean_steps"] == pytest.approx(np.mean(r["steps_used"]))
    used += r["steps_used"]
  assert out == [f"wrote 2 predictions to {out_path} (adaptive, up to depth {R}, mean steps "
                 f"per token {np.mean(used):.2f}; checkpoint step 10)"]


# ---- input mistakes: one line, exit 2 ------------------------------------------------

def test_no_checkpoint(tmp_path, capsys):
  err = _fail(capsys, f"--workdir={tmp_path}", f"--prompt={PROMPT}")
  assert f"no checkpoint in {tmp_path}/checkpoints: train first" in err
  assert os.listdir(tmp_path) == []  # looking created nothing
  err = _fail(capsys, f"--workdir={tmp_path}/nope", f"--prompt={PROMPT}")
  assert f"workdir {tmp_path}/nope does not exist" in err


@pytest.mark.parametrize("case", ["missing_image", "corrupt_image", "too_long",
                                  "unknown_word", "depth_0", "depth_with_adaptive",
                                  "bad_adaptive", "bad_int", "stray_argument"])
def test_bad_input(case, trained_workdir, tmp_path, capsys):
  image = _png(tmp_path / "ok.png")
  corrupt = tmp_path / "x.png"
  corrupt.write_bytes(b"\x00garbage" * 16)
  long_prompt = " ".join(["what colour is the object left of"] * 4) + " ?"
  args, want = {
      "missing_image": ([f"--image={tmp_path}/nope.png"], f"{tmp_path}/nope.png does not exist"),
      "corrupt_image": ([f"--image={corrupt}"], f"cannot read image {corrupt}"),
      "too_long": ([f"--image={image}", f"--prompt={long_prompt}"],
                   "is too long: bos + 29 prompt tokens"),
      "unknown_word": ([f"--image={image}", "--prompt=what colour is the xylophone ?"],
                       "'xylophone' not in the embedded word vocabulary, which is fixed"),
      "depth_0": ([f"--image={image}", "--depth=0"], "--depth=0 must be >= 1"),
      "depth_with_adaptive": ([f"--image={image}", "--depth=2", "--adaptive=0.9"],
                              "--depth and --adaptive exclude each other"),
      "bad_adaptive": ([f"--image={image}", "--adaptive=1.5"], "--adaptive=1.5 must be"),
      "bad_int": ([f"--image={image}", "--depth=two"], "depth"),
      "stray_argument": ([f"--image={image}", "extra"], "unexpected arguments: extra"),
  }[case]
  if not any(a.startswith("--prompt") for a in args):
    args.append(f"--prompt={PROMPT}")
  err = _fail(capsys, f"--workdir={trained_workdir}", *args)
  assert want in err


# ---- the real command line (exit code, stderr) ---------------------------------------

def _cli(*args):
  return subprocess.run([sys.executable, "-m", "rvlm.predict", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


def test_cli_prints_the_answer(loaded, trained_workdir, tmp_path):
  image = _png(tmp_path / "scene.png")
  p = _cli(f"--workdir={trained_workdir}", f"--image={image}", f"--prompt={PROMPT}")
  assert p.returncode == 0, p.stderr
  assert p.stdout.splitlines() == _expected(loaded, [PROMPT], [image], depth=R)


@pytest.mark.parametrize("where", ["before_load", "after_load"])
def test_cli_error_is_one_line(where, trained_workdir, tmp_path):
  if where == "before_load":
    args = [f"--workdir={tmp_path}", f"--prompt={PROMPT}"]
  else:  # the checkpoint is read before the prompt fails: no library chatter either
    args = [f"--workdir={trained_workdir}", "--prompt=play the xylophone"]
  p = _cli(*args)
  assert p.returncode == 2
  assert len(p.stderr.splitlines()) == 1, p.stderr
  assert p.stderr.startswith("rvlm.predict: error: ") and "Traceback" not in p.stderr
  assert p.stdout == ""
