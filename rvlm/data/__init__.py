"""rvlm data: embedded multi-hop VQA, tfds and LLaVA-format sources, tokenizers and
grain pipelines producing the batch contract:

  image [B, H, W, 3] f32 in [-1, 1]   image_mask [B]   tokens / input_mask /
  mask_ar / mask_loss [B, T] int32    family [B]   hops [B]   (+ example_mask [B] eval)

See layout.py for the token layout and skips.py for the bad-input policy.
"""
from rvlm.data.pipeline import build_eval_batches
from rvlm.data.pipeline import build_train_iterator
from rvlm.data.pipeline import family_names
from rvlm.data.skips import reset_skip_counts
from rvlm.data.skips import skip_counts
from rvlm.data.tokenizers import get_tokenizer

__all__ = ["build_eval_batches", "build_train_iterator", "family_names",
           "get_tokenizer", "reset_skip_counts", "skip_counts"]
