"""Per-example preprocessing: decode, resize, normalise, tokenise, lay out.

Runs inside grain workers, so it never drops or counts anything itself: a bad
example comes out with `skip` = a reason code (skips.CODES) and placeholder arrays
of the right shapes, and the main-process filter counts and drops it.
"""
import numpy as np
from PIL import Image

from rvlm.data import layout
from rvlm.data import skips


def load_image(path: str) -> np.ndarray:
  """Decodes an image file to uint8 RGB; raises on unreadable bytes."""
  with Image.open(path) as img:
    img.load()
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes (no aspect-preserving pad) to size x size, uint8 RGB."""
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def normalise(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


class Preprocess:
  """record dict -> example dict of fixed-shape numpy arrays (picklable)."""

  def __init__(self, tokenizer, *, image_size: int, seq_len: int, strict: bool):
    self.tokenizer = tokenizer  # tokenizers.LazyTokenizer
    self.image_size = image_size
    self.seq_len = seq_len
    self.strict = strict

  def _skip(self, reason, record, detail):
    if self.strict:
      raise skips.BadInput(f"{record.get('origin', '?')}: {reason}: {detail}")
    ex = self._blank()
    ex["skip"] = np.int32(skips.CODES[reason])
    return ex

  def _blank(self):
    s, t = self.image_size, self.seq_len
    return dict(
        image=np.zeros((s, s, 3), np.float32), image_mask=np.int32(0),
        tokens=np.zeros(t, np.int32), input_mask=np.zeros(t, np.int32),
        mask_ar=np.ones(t, np.int32), mask_loss=np.zeros(t, np.int32),
        family=np.int32(0), hops=np.int32(0), skip=np.int32(0))

  def __call__(self, record):
    tok = self.tokenizer.get()
    turns = [(tok.encode(q), tok.encode(a)) for q, a in record["turns"]]
    text, reason = layout.layout(turns, self.seq_len, bos=tok.bos_id, eos=tok.eos_id,
                                 pad=tok.pad_id)
    if text is None:
      need = 2 + sum(len(q) + len(a) for q, a in turns[:1])
      return self._skip(reason, record, f"first turn needs {need} tokens > "
                        f"config.data.seq_len={self.seq_len}")
    if reason and self.strict:
      raise skips.BadInput(f"{record.get('origin', '?')}: {reason}: only some turns fit "
                           f"config.data.seq_len={self.seq_len}")
    image, has_image = record.get("image"), 1
    if image is None and record.get("image_path"):
      try:
        image = load_image(record["image_path"])
      except Exception as e:  # pylint: disable=broad-except
        # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError,
        # DecompressionBombError...); all mean the bytes are unusable.
        return self._skip("corrupt_image", record,
                          f"{record['image_path']}: {type(e).__name__}: {e}")
    if image is None:
      x, has_image = np.zeros((self.image_size,) * 2 + (3,), np.float32), 0
    else:
      x = normalise(resize(np.asarray(image, np.uint8), self.image_size))
    ex = dict(image=x, image_mask=np.int32(has_image), **text,
              family=np.int32(record["family"]), hops=np.int32(record["hops"]),
              skip=np.int32(skips.CODES[reason] if reason else 0))
    return ex


def drop_skip(ex):
  """Removes the bookkeeping field once the main-process filter has seen it."""
  ex = dict(ex)
  del ex["skip"]
  return ex
