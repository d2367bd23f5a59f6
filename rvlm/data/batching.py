"""Main-process batching that counts and drops skipped examples exactly once.

Workers hand over chunks (batches of preprocessed examples, bad ones marked with a
`skip` reason code) because grain's per-element transfer between processes costs
more than rendering an example. This stage cuts the chunks into exact local
batches, dropping marked rows and counting each one as it is passed over.

State = (parent state before the current chunk, row within it): restoring refetches
that chunk and resumes at the row, so the next batch is the exact one, and rows
already passed are not counted again.
"""
import grain
import numpy as np

from rvlm.data import skips


class CompactBatches(grain.IterDataset):
  """chunks (dict of [n, ...] arrays with 'skip') -> batches of `batch_size` rows."""

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __iter__(self):
    return _CompactIterator(self._parent.__iter__(), self._batch_size)

  def __str__(self):
    return f"CompactBatches(batch_size={self._batch_size})"


class _CompactIterator(grain.DatasetIterator):

  def __init__(self, parent, batch_size):
    super().__init__(parent)
    self._batch_size = batch_size
    self._chunk = None
    self._chunk_state = parent.get_state()
    self._row = 0
    self._resume_row = None

  def _next_chunk(self):
    self._chunk_state = self._parent.get_state()
    self._chunk = next(self._parent)
    self._row, self._resume_row = self._resume_row or 0, None

  def __next__(self):
    parts, need = [], self._batch_size
    while need:
      if self._chunk is None or self._row >= len(self._chunk["skip"]):
        self._next_chunk()
      codes = self._chunk["skip"]
      keep = []
      while self._row < len(codes) and need:
        code = int(codes[self._row])
        if code:
          reason = skips.REASONS[code - 1]
          skips.count(reason)
        if not code or reason in skips.KEPT:
          keep.append(self._row)
          need -= 1
        self._row += 1
      if keep:
        parts.append({k: v[keep] for k, v in self._chunk.items() if k != "skip"})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return dict(parent=self._chunk_state, row=self._row)

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._chunk_state = state["parent"]
    self._chunk = None
    self._resume_row = state["row"]

  def close(self):
    self._parent.close()
