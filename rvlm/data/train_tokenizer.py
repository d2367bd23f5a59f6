"""Trains a sentencepiece model on a dataset's text.

  python -m rvlm.data.train_tokenizer --config=configs/base.py \\
      --out=/tmp/tok/sp.model --vocab_size=200

Text comes from config.data.name's train split (embedded: the questions and answers
of the first --num_examples examples, generated without rendering; llava: every
turn of config.data.train_json). Ids follow the batch contract: pad 0, unk 1, bos 2,
eos 3, and `<image>` as a user-defined piece. Use the result with
--config.data.tokenizer.kind=sentencepiece --config.data.tokenizer.path=OUT.
"""
import io
import os

from absl import app
from absl import flags
from ml_collections import config_flags



def texts(config, num_examples):
  """Yields the training text of config.data.name's train split."""
  from rvlm.data import pipeline  # pylint: disable=g-import-not-at-top
  src = pipeline.source(config, config.data.name, "train")
  if hasattr(src, "texts"):
    yield from src.texts()
    return
  for i in range(min(num_examples, len(src))):
    if hasattr(src, "text"):
      _, q, a, _, _ = src.text(i)
    else:
      (q, a), = src[i]["turns"]
    yield q
    yield a


def train(sentences, out, vocab_size):
  """Trains a BPE sentencepiece model from an iterable of strings; writes `out`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      user_defined_symbols=["<image>"], character_coverage=1.0,
      # Small corpora cannot always reach vocab_size; take what they support.
      hard_vocab_limit=False, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(model.getvalue())
  return out


def define_flags():
  """The CLI's flags, defined only when run as a program: the trainer imports this
  module (tokenizer 'auto', rvlm/data/resolve.py) and has its own --config."""
  config_flags.DEFINE_config_file("config", None, "Config file.")
  flags.DEFINE_string("out", None, "Output .model path.", required=True)
  flags.DEFINE_integer("vocab_size", 256, "Target vocabulary size.")
  flags.DEFINE_integer("num_examples", 20_000, "Embedded examples to read.")


def main(argv):
  del argv
  fv = flags.FLAGS
  path = train(texts(fv.config, fv.num_examples), fv.out, fv.vocab_size)
  print(f"wrote {path}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
