"""rvlm.answers: VQA-style normalisation of free-text answers, and the normalised
exact match that rvlm.generation_eval.score adds when given the tokenizer."""
import numpy as np
import pytest

from rvlm import answers
from rvlm import generation_eval
from rvlm.data import tokenizers


@pytest.mark.parametrize("pred,ref", [
    ("Yes.", "yes"),
    ("YES", "yes"),
    ("two", "2"),
    ("Ten", "10"),
    ("twenty", "20"),
    ("none", "0"),                       # VQA's answer to "how many" when there are none
    ("a circle", "circle"),
    ("an apple", "apple"),
    ("The Red Square!", "red square"),
    ("  red\tsquare \n", "red square"),  # whitespace collapses
    ("black-and-white", "black and white"),
    ("don't know", "dont know"),
    ("don\u2019t know", "dont know"),    # the typographic apostrophe
    ("3.", "3"),
    ("1,000", "1000"),
    ("\uff13", "3"),                     # a full-width digit (NFKC)
    ("A", "a"),                          # a lone article is the answer, not nothing
    ("", ""),
    ("?!", ""),                          # punctuation only is no answer, like ""
])
def test_spellings_of_one_answer_match(pred, ref):
  assert answers.normalised_match(pred, ref)
  assert answers.normalised_match(ref, pred)


@pytest.mark.parametrize("pred,ref", [
    ("no", "yes"),
    ("circles", "circle"),               # no stemming
    ("red square", "square red"),        # word order counts
    ("3.5", "35"),
    ("3.5", "3 5"),
    ("A", ""),                           # VQA would call these equal
    ("the", ""),
    ("A", "B"),
    ("", "yes"),
    ("twenty one", "21"),                # one word at a time
])
def test_different_answers_do_not_match(pred, ref):
  assert not answers.normalised_match(pred, ref)


def test_normalise_exact_forms():
  n = answers.normalise
  assert n("Yes.") == "yes"
  assert n("3.5") == "3.5" and n("3.5.") == "3.5" and n(".5") == ".5"
  assert n("The Red Square!") == "red square"
  assert n("There are two dogs.") == "there are 2 dogs"
  assert n("50%") == "50"
  assert n("") == "" and n(" . ") == ""
  assert n("the") == "the" and n("a the") == "a the"
  assert n("Été") == "été"             # letters beyond ASCII stay letters


def test_majority_baseline_counts_normalised_answers():
  assert answers.majority_baseline(["Yes.", "yes", "no"]) == pytest.approx(2 / 3)
  assert answers.majority_baseline(["two", "2", "3", "Three", "3."]) == pytest.approx(3 / 5)
  assert answers.majority_baseline(["a"]) == 1.0
  assert answers.majority_baseline([]) == 0.0


# ---- generation_eval.score with a tokenizer ----------------------------------------------

def test_score_adds_normalised_exact_match_with_a_tokenizer():
  tok = tokenizers.ByteTokenizer()
  refs_text = ["yes", "2", "circle", "no"]
  preds_text = ["Yes.", "two", "the circle", "yes"]
  refs = [tok.encode(t) for t in refs_text]
  gen = {"answers": [tok.encode(t) for t in preds_text],
         # The third was cut off by max_new_tokens: no answer, even if it reads right.
         "ended": [True, True, False, True],
         "steps_used": [np.full(len(t) + 1, 2) for t in preds_text], "wall_s": 1.0}
  fams, hops = np.array([0, 0, 1, 1]), np.array([1, 1, 1, 2])
  res = generation_eval.score(gen, refs, fams, hops, ["f0", "f1"], tokenizer=tok)
  assert res["exact_match"] == 0.0
  assert res["normalised_exact_match"] == 0.5
  assert res["by_family"]["f0"]["normalised_exact_match"] == 1.0
  assert res["by_family"]["f1"]["normalised_exact_match"] == 0.0
  assert res["by_hops"]["1"]["normalised_exact_match"] == pytest.approx(2 / 3)
  assert res["by_hops"]["2"]["normalised_exact_match"] == 0.0
  assert res["normalised_majority_baseline"] == 0.25

  # Without the tokenizer (rvlm/train.py's positional call) the result is as before.
  plain = generation_eval.score(gen, refs, fams, hops, ["f0", "f1"])
  assert "normalised_exact_match" not in plain and "normalised_majority_baseline" not in plain
  assert all("normalised_exact_match" not in p for p in plain["by_family"].values())
  assert plain["exact_match"] == res["exact_match"] and plain["f1"] == res["f1"]


def test_normalised_is_never_below_strict():
  """Identical tokens decode to identical text, so normalisation only merges answers;
  with the embedded word tokenizer, "yes ." and "a circle" are other token lists."""
  tok = tokenizers.WordTokenizer()
  refs = [tok.encode(t) for t in ("red", "yes", "circle", "yes")]
  answers_ = [tok.encode(t) for t in ("red", "yes .", "a circle", "no")]
  assert answers_[1] != refs[1] and answers_[2] != refs[2]
  gen = {"answers": answers_, "ended": [True] * 4,
         "steps_used": [np.ones(2)] * 4, "wall_s": 1.0}
  res = generation_eval.score(gen, refs, np.zeros(4, int), np.ones(4, int), ["f"],
                              tokenizer=tok)
  assert res["exact_match"] == 0.25 and res["normalised_exact_match"] == 0.75
  assert res["normalised_majority_baseline"] == 0.5
