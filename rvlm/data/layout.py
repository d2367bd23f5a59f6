"""The text half of the sequence layout (PaliGemma convention), as a pure function.

  tokens     [bos][q1][a1][eos][q2][a2][eos]...[pad...]
  input_mask 1 on every real token, 0 on padding
  mask_ar    0 on bos + the first prompt (prefix: full attention), 1 from the first
             answer on (causal). Later prompts of a multi-turn record are causal
             too: a prefix must be contiguous with the image tokens.
  mask_loss  1 on answer tokens and their eos (the supervised tokens; the trainer
             predicts tokens[t] from position t-1)
The model prepends the image tokens itself; the text holds no image placeholders.
"""
import numpy as np


def layout(turns, seq_len: int, *, bos: int, eos: int, pad: int = 0):
  """Lays out tokenised (prompt_ids, answer_ids) turns in `seq_len` positions.

  Returns (arrays, reason): reason is None when every turn fit, 'truncated_turns'
  when only a leading subset of turns fit (those are laid out), and 'too_long' with
  arrays None when not even the first turn fits. Nothing is ever cut mid-turn: a
  clipped answer would be a silently wrong example.
  """
  tokens, mask_ar, mask_loss = [bos], [0], [0]
  reason = None
  for k, (q, a) in enumerate(turns):
    need = len(q) + len(a) + 1
    if len(tokens) + need > seq_len:
      if k == 0:
        return None, "too_long"
      reason = "truncated_turns"
      break
    tokens += list(q) + list(a) + [eos]
    mask_ar += [0 if k == 0 else 1] * len(q) + [1] * (len(a) + 1)
    mask_loss += [0] * len(q) + [1] * (len(a) + 1)
  n = len(tokens)
  out = dict(
      tokens=np.full(seq_len, pad, np.int32),
      input_mask=np.zeros(seq_len, np.int32),
      # Padding is marked causal like the answer (as in big_vision); input_mask
      # hides it either way.
      mask_ar=np.ones(seq_len, np.int32),
      mask_loss=np.zeros(seq_len, np.int32),
  )
  out["tokens"][:n] = tokens
  out["input_mask"][:n] = 1
  out["mask_ar"][:n] = mask_ar
  out["mask_loss"][:n] = mask_loss
  return out, reason
