"""Tokenizers: embedded words, bytes, sentencepiece (trained here), tokenizer.json."""
import subprocess
import sys

import ml_collections
import pytest

from configs import multihop  # the full family mix
from rvlm import data
from rvlm.data import embedded
from rvlm.data import tokenizers
from rvlm.data import train_tokenizer

ROOT = __file__.rsplit("/tests/", 1)[0]


def _tok_config(**fields):
  return ml_collections.ConfigDict(dict(tokenizer=dict(
      dict(kind="embedded", path="", bos="", eos="", pad=""), **fields)))


def _questions(n=300):
  c = multihop.get_config()
  src = embedded.EmbeddedSource(c.data.embedded, image_size=32, patch_size=8, seed=0,
                                split="train")
  return [t for i in range(n) for t in src.text(i)[1:3]]


def test_embedded_vocabulary_fits_the_small_model_and_round_trips():
  tok = data.get_tokenizer(_tok_config())
  assert tok.vocab_size <= 256
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.image_id == 3
  for text in _questions():
    ids = tok.encode(text)
    assert tok.unk_id not in ids, text
    assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + tok.encode("yes") + [tok.eos_id, 0, 0]) == "yes"
  assert tok.encode("zebra") == [tok.unk_id]


def test_bytes_round_trip_any_text():
  tok = data.get_tokenizer(_tok_config(kind="bytes"))
  text = "Qué colour? <image> 3 + 4 = 7 ✓"
  assert tok.decode(tok.encode(text)) == text and min(tok.encode(text)) >= 4


def test_sentencepiece_trained_here_loads_and_round_trips(tmp_path):
  path = train_tokenizer.train(_questions(), str(tmp_path / "sp.model"), vocab_size=120)
  tok = data.get_tokenizer(_tok_config(kind="sentencepiece", path=path))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  assert tok.image_id is not None and 60 <= tok.vocab_size <= 120
  for text in ["what colour is the object left of the red object ?", "yes", "3"]:
    ids = tok.encode(text)
    assert ids and tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text


def test_train_tokenizer_command(tmp_path):
  out = tmp_path / "tok" / "sp.model"
  subprocess.run([sys.executable, "-m", "rvlm.data.train_tokenizer",
                  f"--config={ROOT}/configs/multihop.py", f"--out={out}", "--vocab_size=100",
                  "--num_examples=500"], check=True, cwd=ROOT, capture_output=True)
  tok = data.get_tokenizer(_tok_config(kind="sentencepiece", path=str(out)))
  assert tok.decode(tok.encode("is there a small circle ?")) == "is there a small circle ?"


def _word_level_json(path):
  import tokenizers as hf  # pylint: disable=g-import-not-at-top
  words = sorted({w for t in _questions(50) for w in t.split()})
  vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
  tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
  tok.decoder = hf.decoders.WordPiece(cleanup=False)   # joins words with spaces
  tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
  tok.save(str(path))
  return vocab


def test_hf_tokenizer_json_loads_and_round_trips(tmp_path):
  vocab = _word_level_json(tmp_path / "tokenizer.json")
  tok = data.get_tokenizer(_tok_config(kind="hf", path=str(tmp_path / "tokenizer.json")))
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, vocab["[CLS]"], vocab["[SEP]"])
  assert tok.vocab_size == len(vocab)
  text = "what shape is the red object ?"
  ids = tok.encode(text)
  assert len(ids) == 7 and tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
  named = data.get_tokenizer(_tok_config(kind="hf", path=str(tmp_path / "tokenizer.json"),
                                         bos="[SEP]", eos="[CLS]"))
  assert (named.bos_id, named.eos_id) == (vocab["[SEP]"], vocab["[CLS]"])
  with pytest.raises(ValueError, match="no bos token"):
    data.get_tokenizer(_tok_config(kind="hf", path=str(tmp_path / "tokenizer.json"),
                                   bos="<s>"))


def test_pipeline_with_a_sentencepiece_tokenizer(tmp_path):
  path = train_tokenizer.train(_questions(), str(tmp_path / "sp.model"), vocab_size=120)
  c = multihop.get_config()
  c.data.batch_size = 8
  c.data.tokenizer.kind, c.data.tokenizer.path = "sentencepiece", path
  it = data.build_train_iterator(c)
  b = next(it)
  it.close()
  tok = data.get_tokenizer(c.data)
  assert (b["tokens"][:, 0] == tok.bos_id).all()
  answers = [tok.decode(b["tokens"][r][b["mask_loss"][r] == 1].tolist()) for r in range(8)]
  assert all(a and " " not in a for a in answers)


def test_tokenizer_errors_name_the_field():
  with pytest.raises(ValueError, match="config.data.tokenizer.kind='gpt'"):
    tokenizers.get_tokenizer(_tok_config(kind="gpt"))
  with pytest.raises(ValueError, match="config.data.tokenizer.path"):
    tokenizers.get_tokenizer(_tok_config(kind="sentencepiece"))
  c = multihop.get_config()
  c.model.vocab_size = 64
  with pytest.raises(ValueError, match="config.model.vocab_size=64"):
    data.build_train_iterator(c)
