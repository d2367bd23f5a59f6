"""python -m rvlm.evaluate (free-running generation per depth) and the decode latency
benchmark, on the session's trained debug workdir (R = 2)."""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rvlm import data as data_lib
from rvlm import evaluate
from rvlm import generation_eval
from rvlm import generation_report
from rvlm import inference
from rvlm import steps
from rvlm.data import layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every in-process run decodes the same shapes, so generate compiles once per setting.
NUM_EXAMPLES, BATCH = 32, 16
_TEXT = ("tokens", "input_mask", "mask_ar", "mask_loss")


# ---- scoring ------------------------------------------------------------------------

def test_token_f1_exact_values():
  f1 = generation_eval.token_f1
  assert f1([1, 2, 3], [1, 2, 3]) == 1.0
  assert f1([3, 2, 1], [1, 2, 3]) == 1.0          # a bag: order does not matter
  assert f1([1, 2], [2, 3]) == 0.5                # P = R = 1/2
  assert f1([1, 2, 3, 4], [1]) == pytest.approx(0.4)   # P = 1/4, R = 1: 2PR/(P+R)
  assert f1([1, 1, 2], [1, 2, 2]) == pytest.approx(2 / 3)  # counts clip: 1 and 2 once
  assert f1([1, 1], [1]) == pytest.approx(2 / 3)  # P = 1/2, R = 1
  assert f1([4], [5]) == 0.0
  assert f1([], [5]) == 0.0 and f1([5], []) == 0.0
  assert f1([], []) == 1.0


def test_exact_match_needs_the_same_tokens_and_an_eos():
  em = generation_eval.exact_match
  assert em([7], [7]) and em([7, 8], [7, 8]) and em([], [])
  assert not em([7, 8], [7]) and not em([7], [7, 8]) and not em([8, 7], [7, 8])
  assert not em([7], [7], ended=False)   # cut off by max_new_tokens: no answer yet


def test_generated_answers_stop_at_eos():
  eos = 2
  answers, ended = generation_eval.generated_answers(
      np.array([[5, eos, 0], [5, 6, 7], [eos, 0, 0]]), np.array([1, 3, 0]), eos)
  assert answers == [[5], [5, 6, 7], []]
  assert ended == [True, False, True]


def test_cut_prompt_from_a_laid_out_example():
  bos, eos = 1, 2
  q, a = [10, 11, 12], [20]
  ex, _ = layout.layout([(q, a)], 12, bos=bos, eos=eos)
  assert generation_eval.cut_prompt(ex, eos) == ([bos] + q, a)
  # A multi-token answer, and a second turn: only the first question and answer.
  ex, reason = layout.layout([(q, [20, 21]), ([13], [22])], 12, bos=bos, eos=eos)
  assert reason is None
  assert generation_eval.cut_prompt(ex, eos) == ([bos] + q, [20, 21])


def test_prompt_batch_pads_and_fills_padding_rows():
  bos, eos, s = 1, 2, 4
  rows = [layout.layout([(q, a)], 10, bos=bos, eos=eos)[0]
          for q, a in [([10, 11, 12], [20]), ([13], [21, 22])]]
  blank = {k: np.zeros_like(v) for k, v in rows[0].items()}
  batch = {k: np.stack([rows[0][k], rows[1][k], blank[k]]) for k in rows[0]}
  batch.update(image=np.arange(3 * s * s * 3, dtype=np.float32).reshape(3, s, s, 3),
               image_mask=np.array([1, 0, 0], np.int32), example_mask=np.array([1, 1, 0]))
  out = generation_eval.prompt_batch(batch, 5, eos)
  np.testing.assert_array_equal(out["tokens"], [[1, 10, 11, 12, 0], [1, 13, 0, 0, 0],
                                                [1, 10, 11, 12, 0]])
  np.testing.assert_array_equal(out["input_mask"], [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0],
                                                    [1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(out["image_mask"], [1, 0, 1])
  np.testing.assert_array_equal(out["image"][2], batch["image"][0])
  assert generation_eval.references([batch], eos) == [[20], [21, 22]]
  assert generation_eval.max_prompt_length([batch]) == 4
  assert generation_eval.default_max_new_tokens([batch], eos) == 3


# ---- against the trainer's teacher-forced evaluation -----------------------------------

@pytest.fixture(scope="module")
def loaded(trained_workdir):
  return inference.load(trained_workdir)


def test_free_running_matches_teacher_forced_on_one_token_answers(loaded):
  """Greedy token 1 right means token 2 (eos) is predicted from the very prefix the
  teacher-forced pass sees, so on one-token answers the two exact matches agree
  example by example, at every depth. The 10-step model gets no answer right (it says
  eos at once), so every other example is laid out again with the model's own greedy
  answer at that depth as its reference: there both must say right, elsewhere wrong."""
  config, eos = loaded.config, loaded.tokenizer.eos_id
  bos, seq_len = loaded.tokenizer.bos_id, int(config.data.seq_len)
  r_max = int(config.model.recursion.num_steps)
  batches = data_lib.build_eval_batches(config, "val", BATCH, NUM_EXAMPLES)
  for b in batches:  # keep the one-token answers only
    one = [len(generation_eval.cut_prompt({k: b[k][i] for k in _TEXT}, eos)[1]) == 1
           for i in range(b["tokens"].shape[0])]
    b["example_mask"] = b["example_mask"] * np.array(one, np.int32)
  assert len(generation_eval.references(batches, eos)) >= NUM_EXAMPLES // 2

  eval_fn = jax.jit(functools.partial(steps.eval_step, model=loaded.model, num_steps=r_max))
  outcomes = []
  for r in range(1, r_max + 1):
    gen = generation_eval.run(loaded, batches, depth=r, max_new_tokens=2)
    assert all(s.size and (s == r).all() for s in gen["steps_used"])
    own = iter(zip(gen["answers"], gen["ended"]))
    relabeled, k = [], 0
    for b in batches:
      b = {key: v.copy() for key, v in b.items()}
      for i in np.flatnonzero(b["example_mask"]):
        answer, ended = next(own)
        if k % 2 == 0 and ended:
          prompt, _ = generation_eval.cut_prompt({key: b[key][i] for key in _TEXT}, eos)
          text, _ = layout.layout([(prompt[1:], answer)], seq_len, bos=bos, eos=eos)
          for key in _TEXT:
            b[key][i] = text[key]
        k += 1
      relabeled.append(b)
    refs = generation_eval.references(relabeled, eos)
    free = np.array([generation_eval.exact_match(a, ref, e)
                     for a, ref, e in zip(gen["answers"], refs, gen["ended"])])
    teacher = np.concatenate([np.asarray(eval_fn(loaded.params, b)["exact"])[r - 1]
                              [b["example_mask"] > 0] for b in relabeled])
    np.testing.assert_array_equal(free, teacher, err_msg=f"depth {r}")
    outcomes += free.tolist()
  assert any(outcomes) and not all(outcomes)


# ---- the command line -------------------------------------------------------------------

def _main(*args):
  with pytest.raises(SystemExit) as e:
    evaluate.main(["rvlm.evaluate", *args])
    raise SystemExit(0)
  return e.value.code


def test_cli_writes_json_markdown_and_plot(trained_workdir, capsys):
  assert _main(f"--workdir={trained_workdir}", "--split=val", f"--num_examples={NUM_EXAMPLES}",
               f"--batch_size={BATCH}", "--adaptive=0.5,1") == 0
  base = os.path.join(trained_workdir, "eval", "generation_val")
  with open(base + ".json") as f:
    res = json.load(f)
  assert res["depths"] == [1, 2] and res["thresholds"] == [0.5, 1.0]
  assert res["trained_depth"] == 2 and res["num_examples"] == NUM_EXAMPLES
  assert res["machine"]["devices"] and "processor" in res["machine"]
  names = data_lib.family_names(inference.load_config(trained_workdir)[0])
  for key in ("1", "2", ):
    d = res["by_depth"][key]
    assert 0 <= d["exact_match"] <= d["f1"] <= 1   # an exact match has F1 = 1
    # Normalisation (rvlm/answers.py) can only merge answers, never split them.
    assert 0 <= d["exact_match"] <= d["normalised_exact_match"] <= 1
    assert d["mean_steps_per_token"] == int(key)
    assert d["ms_per_token"] > 0 and d["tokens_per_s"] > 0
    assert set(d["by_family"]) <= set(names) and d["by_family"]
    assert sum(v["num_examples"] for v in d["by_hops"].values()) == NUM_EXAMPLES
    for part in list(d["by_family"].values()) + list(d["by_hops"].values()):
      assert {"exact_match", "f1", "num_examples", "normalised_exact_match"} <= set(part)
      assert part["exact_match"] <= part["normalised_exact_match"] <= 1
  assert 0 < res["normalised_majority_baseline"] <= 1
  for t in ("0.5", "1"):
    a = res["adaptive"][t]
    assert 1 <= a["mean_steps_per_token"] <= 2
    assert a["exact_match"] <= a["normalised_exact_match"] <= 1
    assert a["steps_fraction_of_trained"] == pytest.approx(a["mean_steps_per_token"] / 2)
  with open(base + ".md") as f:
    md = f.read()
  assert "| r = 2 |" in md and "## Adaptive exit at R = 2" in md and "## Exact match by hops" in md
  assert "| setting | exact match | normalised | F1 |" in md
  with open(base + ".png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  out = capsys.readouterr().out
  assert "r = 1" in out and "adaptive 0.5 (R = 2)" in out and " norm. " in out
  assert out.strip().splitlines()[-2] == generation_report.table(res).splitlines()[-1]


@pytest.mark.parametrize("args,says", [
    (["--depths=0"], "every depth must be >= 1"),
    (["--depths=1,x"], "not a list of ints"),
    (["--adaptive=0"], "(0, 1]"),
    (["--adaptive=1.5"], "(0, 1]"),
    (["--bogus=1"], "bogus"),
])
def test_bad_input_exits_2_with_one_line(trained_workdir, capsys, args, says):
  assert _main(f"--workdir={trained_workdir}", *args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("rvlm.evaluate: error: ") and says in err[0], err


def test_no_checkpoint_exits_2(tmp_path, capsys):
  assert _main(f"--workdir={tmp_path}") == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("rvlm.evaluate: error: no checkpoint in"), err


def test_unknown_split_exits_2_in_a_subprocess(trained_workdir):
  """The real entry point (app.run) after loading the checkpoint: no traceback and no
  library logs, one line, exit 2."""
  p = subprocess.run([sys.executable, "-m", "rvlm.evaluate", f"--workdir={trained_workdir}",
                      "--split=nope"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert p.returncode == 2, p.stderr
  err = p.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("rvlm.evaluate: error: --split=nope: "), err


# ---- the benchmark ----------------------------------------------------------------------

def test_decode_latency_benchmark_smoke(trained_workdir):
  # --workdir: the trained debug model (configs/debug.py), which also spares the
  # benchmark compiling a random init.
  p = subprocess.run([sys.executable, "benchmarks/decode_latency.py",
                      f"--workdir={trained_workdir}", "--new_tokens=2", "--repeats=1",
                      "--max_depth=1"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stdout.splitlines()
  assert lines[0].startswith("machine: ") and lines[1].startswith("config: R=2")
  rows = [ln.split() for ln in lines[3:]]
  assert [r[0] for r in rows] == ["1"]
  assert "first token ms" in lines[2]
  assert float(rows[0][1]) > 0                 # the first token (the prefill's) ms
  assert rows[0][4] == "1.00" and rows[0][5] == "1.00" and rows[0][6].endswith("x")
  assert rows[0][7] == "2/2"   # the cache and recomputation chose the same tokens
