"""Length-aware batches: cut the text padding of a batch down to the smallest of a few
bucket lengths that holds its longest example.

Examples are laid out at `config.data.seq_len` (rvlm/data/layout.py: real tokens first,
then padding), so a batch of short records is mostly padding. Cutting the trailing
columns every row has as padding changes nothing the model computes (padding is masked
out of attention and loss; positions count real tokens) and saves their cost. Bucket
lengths, not the exact longest length, keep jit to a handful of compiled shapes.

`config.data.buckets`:
  "none"        off: every batch at seq_len (the default; the embedded questions all
                have nearly the same length)
  "auto"        16, 32, 64, ... below seq_len, and seq_len
  "16,32,96"    these lengths (each <= seq_len), and seq_len

In a multi-process run every process must cut its rows of the global batch to the same
length: the trainer takes the maximum over processes (`global_length`). Eval batches are
built whole in every process, so `build_eval_batches` cuts them from the global batch.
"""
import numpy as np

TEXT_KEYS = ("tokens", "input_mask", "mask_ar", "mask_loss")


def boundaries(data_config):
  """The sorted bucket lengths of `config.data` (() when bucketing is off)."""
  spec, seq_len = str(data_config.get("buckets", "none")).strip(), int(data_config.seq_len)
  if spec in ("none", ""):
    return ()
  if spec == "auto":
    lengths, n = [], 16
    while n < seq_len:
      lengths.append(n)
      n *= 2
    return tuple(lengths) + (seq_len,)
  try:
    lengths = sorted({int(x) for x in spec.split(",") if x.strip()})
  except ValueError:
    raise ValueError(f"config.data.buckets={spec!r}: use 'none', 'auto' or comma-separated "
                     "lengths like '16,32,64'") from None
  if not lengths or lengths[0] < 1 or lengths[-1] > seq_len:
    raise ValueError(f"config.data.buckets={spec!r}: lengths must be in [1, "
                     f"config.data.seq_len={seq_len}]")
  return tuple(x for x in lengths if x < seq_len) + (seq_len,)


def needed_length(batch):
  """Columns up to the last real token of any row (at least 1)."""
  mask = np.asarray(batch["input_mask"])
  cols = np.flatnonzero(mask.any(axis=0))
  return int(cols[-1]) + 1 if cols.size else 1


def bucket_length(length, lengths):
  """The smallest bucket >= length (the last one if none is: nothing is ever cut off)."""
  for b in lengths:
    if b >= length:
      return b
  return lengths[-1]


def trim(batch, length):
  """`batch` with its text arrays cut to `length` columns; only padding may go."""
  if needed_length(batch) > length:
    raise ValueError(f"cannot cut the batch to {length} text positions: a row needs "
                     f"{needed_length(batch)}")
  return {k: (v[:, :length] if k in TEXT_KEYS else v) for k, v in batch.items()}


def global_length(batch, lengths):
  """The bucket length for a batch whose rows are spread over processes: every process
  calls this with its own rows and gets the same answer."""
  need = needed_length(batch)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    need = int(np.max(multihost_utils.process_allgather(np.int32(need))))
  return bucket_length(need, lengths)
