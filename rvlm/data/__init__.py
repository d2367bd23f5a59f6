"""rvlm data: embedded multi-hop VQA, tfds and LLaVA-format sources, tokenizers and
grain pipelines producing the batch contract:

  image [B, H, W, 3] f32 in [-1, 1]   image_mask [B]   tokens / input_mask /
  mask_ar / mask_loss [B, T] int32    family [B]   hops [B]   (+ example_mask [B] eval)

See layout.py for the token layout and skips.py for the bad-input policy.
"""
from rvlm.data import buckets
from rvlm.data import curriculum
from rvlm.data import pipeline
from rvlm.data import resolve
from rvlm.data.pipeline import build_eval_batches
from rvlm.data.pipeline import family_names
from rvlm.data.skips import reset_skip_counts
from rvlm.data.skips import skip_counts
from rvlm.data.tokenizers import get_tokenizer


def build_train_iterator(config, process_index=0, process_count=1):
  """The train iterator: a CurriculumIterator when config.data.curriculum is enabled."""
  if curriculum.check_config(config) is not None:
    return curriculum.CurriculumIterator(config, process_index, process_count)
  return pipeline.build_train_iterator(config, process_index, process_count)


__all__ = ["buckets", "build_eval_batches", "build_train_iterator", "family_names",
           "get_tokenizer", "reset_skip_counts", "resolve", "skip_counts"]
