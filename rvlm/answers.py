"""Free-text answer matching in the manner of the VQA v2 evaluation.

LLaVA-format data carries answers as people write them ("Yes.", "two", "a circle"),
and a model trained on one spelling is called wrong on another by token exact match.
`normalise` maps the spellings that mean the same short answer to one string, after
the answer processing of the official VQA v2 evaluation (vqaEval.py: punctuation,
digits and articles), with the deviations listed in its docstring.
"""
import collections
import re
import unicodedata

# VQA v2 maps zero..ten and 'none' (the usual answer to "how many ...?" when there
# are none); eleven..twenty follow the same rule.
_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve "
                 "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty")
_NUMBERS = {**{w: str(i) for i, w in enumerate(_NUMBER_WORDS.split())}, "none": "0"}
_ARTICLES = frozenset(("a", "an", "the"))
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`]")
# Any character that is neither a letter, a digit nor whitespace, and the underscore
# (\w counts it as a letter), except a period before a digit: the decimal point of
# "3.5" and ".5".
_PUNCTUATION = re.compile(r"\.(?!\d)|[^\w\s.]|_")


def normalise(text: str) -> str:
  """The canonical form of a short free-text answer, in this order:

  1. Unicode NFKC (full-width letters and digits become ASCII ones) and lower case.
  2. A comma between two digits is deleted: "1,000" -> "1000".
  3. Apostrophes (' ` and the typographic ones) are deleted: "don't" -> "dont". VQA
     instead maps a table of apostrophe-less contractions to their spelling with one
     ("dont" -> "don't"); deleting them joins the same pairs, and every other one.
  4. Every other character that is not a letter, a digit or whitespace becomes a
     space, except a period followed by a digit: "3.5" and ".5" keep theirs, "3." and
     "yes." lose it, "black-and-white" -> "black and white", "50%" -> "50".
  5. The text is split into words at whitespace. Number words become digits:
     "zero".."twenty" -> "0".."20", and "none" -> "0" (as in VQA, which stops at ten).
  6. The articles "a", "an" and "the" are dropped, unless nothing else is left: "a
     circle" -> "circle", but "A" -> "a" (VQA drops it too, so the multiple-choice
     answer "A" would become "" and equal an empty answer and "the").
  7. The words are joined by single spaces, so that leading, trailing and repeated
     whitespace (tabs and newlines included) go.

  "" and answers of punctuation only become "". Nothing else is changed: plurals,
  synonyms and word order stay apart ("circles" != "circle", "2 red" != "red 2").
  """
  text = unicodedata.normalize("NFKC", text).lower()
  text = _APOSTROPHES.sub("", _THOUSANDS.sub("", text))
  words = [_NUMBERS.get(w, w) for w in _PUNCTUATION.sub(" ", text).split()]
  content = [w for w in words if w not in _ARTICLES]
  return " ".join(content or words)


def normalised_match(pred_text: str, ref_text: str) -> bool:
  """Whether the two answers are equal after `normalise`; two empty answers are."""
  return normalise(pred_text) == normalise(ref_text)


def majority_baseline(refs_text) -> float:
  """Accuracy, under `normalised_match`, of always giving the most frequent normalised
  reference answer: its share of `refs_text` (0.0 for none). "Yes." and "yes" count
  as one answer here, as they do when a prediction is scored."""
  counts = collections.Counter(normalise(t) for t in refs_text)
  if not counts:
    return 0.0
  return counts.most_common(1)[0][1] / sum(counts.values())
