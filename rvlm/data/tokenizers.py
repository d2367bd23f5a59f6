"""Tokenizers behind one interface: embedded words, UTF-8 bytes, sentencepiece, HF
tokenizer.json.

Every tokenizer has `vocab_size`, `encode(str) -> list[int]` (no special tokens),
`decode(ids) -> str` (special tokens dropped), and `pad_id` / `bos_id` / `eos_id` /
`image_id`. Padding is always id 0 in the batch contract; positions are told apart by
`input_mask`, so a tokenizer whose id 0 is a real token (e.g. a Llama `<unk>`) is
still correct. `image_id` is informational: the model prepends image tokens itself and
the text never contains placeholders; it is None where the vocabulary has none.

Tokenizers are built lazily from (kind, path) so that grain workers unpickle a few
strings rather than a native object.
"""
import re

from rvlm.data import chase
from rvlm.data import scenes

PAD, BOS, EOS, IMAGE, UNK = "<pad>", "<bos>", "<eos>", "<image>", "<unk>"

# The embedded word vocabulary: every word the embedded questions and answers use,
# numbers up to 64 (counts and hops on larger grids), and a few LLaVA-ish extras.
_WORDS = (
    ("?", ".", ",", "what", "colour", "shape", "size", "is", "the", "object",
     "of", "left", "right", "above", "below", "start", "at", "follow", "arrow",
     "arrows", "how", "many", "are", "there", "a", "same", "as", "yes", "no",
     "and", "in", "image")
    + scenes.COLOUR_NAMES + scenes.SHAPES + ("squares", "circles", "triangles",
                                             "diamonds") + scenes.SIZES
    + tuple(str(k) for k in range(65))
    # Appended (not inserted) so that earlier ids, and checkpoints, stay valid.
    + ("where", "does", "chain", "end") + chase.NAMES)
_TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
  """Whitespace/punctuation word tokenizer over the fixed embedded vocabulary."""

  def __init__(self):
    self._itos = (PAD, BOS, EOS, IMAGE, UNK) + tuple(dict.fromkeys(_WORDS))
    self._stoi = {w: i for i, w in enumerate(self._itos)}
    self.pad_id, self.bos_id, self.eos_id, self.image_id, self.unk_id = range(5)

  @property
  def vocab_size(self):
    return len(self._itos)

  def encode(self, text):
    return [self._stoi.get(w, self.unk_id) for w in _TOKEN_RE.findall(text.lower())]

  def decode(self, ids):
    return " ".join(self._itos[i] for i in ids
                    if 0 <= i < len(self._itos) and i > self.unk_id)

  def words(self):
    return self._itos


class ByteTokenizer:
  """UTF-8 bytes (id = byte + 4) after pad/bos/eos/image: any text, no files."""

  def __init__(self):
    self.pad_id, self.bos_id, self.eos_id, self.image_id = range(4)

  @property
  def vocab_size(self):
    return 256 + 4

  def encode(self, text):
    return [b + 4 for b in text.encode("utf-8")]

  def decode(self, ids):
    return bytes(i - 4 for i in ids if 4 <= i < 260).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A sentencepiece `.model`; bos/eos/image from the model's own pieces."""

  def __init__(self, path):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.pad_id = 0
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"sentencepiece model {path} has no bos/eos pieces")
    image = self._sp.piece_to_id(IMAGE)
    self.image_id = image if image != self._sp.unk_id() else None

  @property
  def vocab_size(self):
    return self._sp.get_piece_size()

  def encode(self, text):
    return list(self._sp.encode(text))

  def decode(self, ids):
    keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and
            not self._sp.is_control(int(i)) and int(i) != self.pad_id]
    return self._sp.decode(keep)


class HFTokenizer:
  """A HuggingFace `tokenizer.json` through the `tokenizers` package.

  bos/eos/pad are looked up by the names given in config.data.tokenizer (bos, eos,
  pad), else among common spellings; a missing bos/eos is an error.
  """
  _BOS = ("<s>", "<bos>", "[CLS]", "<|begin_of_text|>", "<|startoftext|>")
  _EOS = ("</s>", "<eos>", "[SEP]", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
  _PAD = ("<pad>", "[PAD]", "<|pad|>")

  def __init__(self, path, bos="", eos="", pad=""):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._tok.no_padding()
    self._tok.no_truncation()

    def find(given, names, what):
      for name in ((given,) if given else names):
        i = self._tok.token_to_id(name)
        if i is not None:
          return i
      if what == "pad":
        return 0
      raise ValueError(f"tokenizer {path}: no {what} token among "
                       f"{(given,) if given else names}; set config.data.tokenizer.{what}")

    self.bos_id = find(bos, self._BOS, "bos")
    self.eos_id = find(eos, self._EOS, "eos")
    self.pad_id = find(pad, self._PAD, "pad")
    self.image_id = self._tok.token_to_id(IMAGE)

  @property
  def vocab_size(self):
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text):
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def get_tokenizer(data_config):
  """config.data.tokenizer's tokenizer (kind: embedded | bytes | sentencepiece | hf)."""
  tcfg = data_config.tokenizer
  kind, path = tcfg.kind, tcfg.get("path", "")
  if kind == "embedded":
    return WordTokenizer()
  if kind == "bytes":
    return ByteTokenizer()
  if kind in ("sentencepiece", "hf") and not path:
    raise ValueError(f"config.data.tokenizer.path must name a file for kind={kind!r}")
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  if kind == "hf":
    return HFTokenizer(path, tcfg.get("bos", ""), tcfg.get("eos", ""), tcfg.get("pad", ""))
  if kind == "auto":
    raise ValueError("config.data.tokenizer.kind='auto' is settled by the trainer in its "
                     "workdir (WORKDIR/tokenizer/sp.model, rvlm/data/resolve.py); here name "
                     "that file with kind=sentencepiece and tokenizer.path")
  raise ValueError(f"config.data.tokenizer.kind={kind!r} unknown; choose embedded, "
                   "bytes, sentencepiece or hf")


class LazyTokenizer:
  """Picklable handle: builds the tokenizer on first use in each process."""

  def __init__(self, data_config):
    self._tcfg = dict(data_config.tokenizer)
    self._tok = None

  def get(self):
    if self._tok is None:
      import ml_collections  # pylint: disable=g-import-not-at-top
      self._tok = get_tokenizer(ml_collections.ConfigDict(dict(tokenizer=self._tcfg)))
    return self._tok

  def __getstate__(self):
    return dict(_tcfg=self._tcfg, _tok=None)
