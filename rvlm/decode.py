"""Answering questions: prefill the image + prompt, then extend token by token with one
KV cache per (recursion step, layer).

  gen = decode.generate(model, params, batch, depth=3, max_new_tokens=8, eos_id=2)
  decode.answer_text(tokenizer, gen.tokens[0])

`batch` holds the prompts: {'image' [B, S, S, 3], 'image_mask' [B], 'tokens' [B, T]
([bos] + prompt, right-padded with 0), 'input_mask' [B, T]}; rows may differ in length.

How one token is decoded at depth r (the trained model's forward pass, one position):
  e_1 = embed(token); for s = 1..r: step s's layers write the token's keys and values
  to step s's cache and attend over it; the connector (text weights) builds e_(s+1)
  from the token's own sampled layer outputs and its own e_1 (vanilla: e_(s+1) = h_s).
The prediction is the shared final norm + head on h_r. Depth r is free at inference:
any r >= 1, also beyond the trained R (mode 'none': r = 1).

Cache: keys [B * K, D, slots] and values [B * K, slots, D] per layer (rows are (prompt,
KV head) pairs; the layouts the attention's matmuls read in place); slots = image tokens
+ T prompt slots + one per new token. At a fixed depth the token loop holds one such
buffer per (step, layer), each written in place at the token's slot; the prefill and
adaptive exit hold every step's stacked, [r, B * K, ...] per layer. The prompt's padding slots are never
visible and RoPE positions count real tokens only, so every row decodes as it would
alone, and as the trainer's forward pass sees the same text with the padding in the
middle (`recompute_logits`, the reference).
Under config.model.attention='causal' the prompt (image included) is prefilled
causally; a new token sees every earlier slot either way.

Adaptive exit (`Adaptive`): a generated token stops recursing at the first step s whose
top probability reaches `threshold`, or (stable_steps = n >= 2) whose argmax has been
the same for n consecutive steps; r is the cap. Its prediction is step s's. Rule for
the cache: the token's keys and values at steps s+1..r are copies of step s's, so later
tokens' step-s' layers read the exit step's keys and values for it. A batch stops
computing steps once every row has exited. The prompt is always prefilled at all r steps
(one parallel pass); the first answer token exits by the same rule over the prefill's
per-step predictions.

Everything runs in one jitted program per (shapes, depth, max_new_tokens, sampling,
adaptive): a while loop over tokens, and one over steps; no recompilation per token.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from rvlm.models import connector
from rvlm.models import decoder
from rvlm.models import layers
from rvlm.models import vlm
from rvlm.models.recursion import RecursionStep

PROMPT_KEYS = ("image", "image_mask", "tokens", "input_mask")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0: greedy (argmax). top_k 0 and top_p 1: no truncation."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def check(self):
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"sampling temperature={self.temperature!r}: must be a finite number >= 0")
    if self.top_k < 0:
      raise ValueError(f"sampling top_k={self.top_k!r}: must be >= 0 (0: off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"sampling top_p={self.top_p!r}: must be in (0, 1] (1: off)")


@dataclasses.dataclass(frozen=True)
class Adaptive:
  """Per-token early exit: top probability >= threshold, or the argmax unchanged for
  `stable_steps` consecutive steps (0: that rule off)."""
  threshold: float = 1.0
  stable_steps: int = 0

  def check(self):
    if not 0 < self.threshold <= 1:
      raise ValueError(f"adaptive threshold={self.threshold!r}: must be in (0, 1]")
    if self.stable_steps == 1 or self.stable_steps < 0:
      raise ValueError(f"adaptive stable_steps={self.stable_steps!r}: must be 0 (off) or >= 2")


@dataclasses.dataclass
class Generation:
  tokens: np.ndarray          # [B, max_new_tokens] int32: the answer, eos included, 0 after
  lengths: np.ndarray         # [B] answer tokens before eos (all, if no eos came)
  steps_used: np.ndarray      # [B, max_new_tokens] recursion steps per token (0 after eos)
  logits: np.ndarray | None   # [B, max_new_tokens, V] float32, the logits each token came from

  def mean_steps(self):
    """Mean recursion steps per generated token (eos included)."""
    used = self.steps_used[self.steps_used > 0]
    return float(used.mean()) if used.size else 0.0


def answer_text(tokenizer, tokens_row):
  """The text of one generated row, up to (not including) eos."""
  ids = [int(t) for t in tokens_row]
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def check_depth(model, depth):
  mode = model.cfg.recursion.mode
  if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
    raise ValueError(f"depth={depth!r}: must be an integer >= 1")
  if mode == "none" and depth != 1:
    raise ValueError(f"depth={depth}: a standard model (recursion mode 'none') has depth 1 only")


# ---- the model's pieces, applied to their params ---------------------------------------


def _step(model):
  # Per-layer and per-modality params, sliced once per call (_step_params): slicing a
  # layer out of the stacked layer params, or a modality out of the connector's kernels,
  # copies it, and inside the decoding loop that copy recurs on every step of every
  # token (the layers' alone were a third of the small preset's per-token time on CPU).
  kwargs = vlm.step_kwargs(model.cfg)
  kwargs["stack_kwargs"] = dict(kwargs["stack_kwargs"], layerwise=True)
  kwargs["connector_kwargs"] = dict(kwargs["connector_kwargs"], split_modalities=True)
  return RecursionStep(mode=model.cfg.recursion.mode, **kwargs)


_PREPARED = "layer_0"   # the layerwise stack's first layer: params already prepared


def _step_params(params):
  step = dict(params["recursion"]["step"])
  if _PREPARED in step["stack"]:
    return step
  step["stack"] = decoder.layerwise_params(step["stack"])
  if "connector" in step:
    step["connector"] = connector.split_modality_params(step["connector"])
  return step


@jax.jit
def prepare_params(params):
  """`params` with the recursion step in the layout decoding runs (one subtree per
  layer, the connector's kernels per modality), for callers that decode many times
  with the same params: `generate` otherwise slices them on every call, which copies
  the decoder's weights (time, and that much memory while the call runs). `generate`
  takes either form; the trainer and checkpoints only ever see the stacked one."""
  return dict(params, recursion=dict(params["recursion"], step=_step_params(params)))


def _empty_cache(model, batch_size, depth, slots, dtype):
  """Per layer, (keys [depth, B * K, D, S], values [depth, B * K, S, D]) for every step:
  the layout of the prompt's prefill, a scan over the steps."""
  dec = model.cfg.decoder
  shapes = layers.kv_cache_shapes(batch_size, dec.num_kv_heads, dec.head_dim, slots)
  return tuple(tuple(jnp.zeros((depth,) + s, dtype) for s in shapes) for _ in range(dec.depth))


def _split_steps(cache):
  """The prefill's per-layer cache as the fixed-depth token loop carries it:
  cache[step][layer] = (keys, values), one buffer each, updated in place at its slot.
  Indexing a step or a layer out of one stacked array inside the loop copies it (and
  stacking the result back copies the whole cache) on every step of every token."""
  depth = cache[0][0].shape[0]
  return tuple(tuple((k[s], v[s]) for k, v in cache) for s in range(depth))


def _select(logits, rng, sampling):
  """[B, V] float32 logits -> [B] token ids."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  neg = jnp.finfo(jnp.float32).min
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if sampling.top_p < 1:
    # Keep the most probable tokens until their mass reaches top_p (always the top one).
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(before < sampling.top_p, sorted_logits, neg)
    logits = jnp.full_like(logits, neg).at[
        jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _exit_update(state, logits, step, last, adaptive):
  """One step of the exit rule. state = (exited, exit_step, out_logits, prev_arg, run)."""
  exited, exit_step, out_logits, prev_arg, run = state
  arg = jnp.argmax(logits, axis=-1)
  run = jnp.where(arg == prev_arg, run + 1, 1)
  exits = jnp.full(arg.shape, last)
  if adaptive is not None:
    top = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
    exits = exits | (top >= adaptive.threshold)
    if adaptive.stable_steps:
      exits = exits | (run >= adaptive.stable_steps)
  out_logits = jnp.where(exited[:, None], out_logits, logits)
  exit_step = jnp.where(exited, exit_step, step)
  return exited | exits, exit_step, out_logits, arg, run


# ---- the decoding program --------------------------------------------------------------


def _generate_fn(model, depth, max_new_tokens, sampling, adaptive, return_logits):
  step_module = _step(model)
  # [B, 1, d] -> [B, V]: the head's sharding constraint names (batch, length, vocab).
  head = lambda p, h: model.apply({"params": p}, h, method=vlm.VLM.logits)[:, 0]  # noqa: E731

  def run_step(step_params, e, e0, mask, positions, kv, index, num_image_tokens):
    return step_module.apply({"params": step_params}, e, e0, mask, positions, kv, index,
                             num_image_tokens)

  def prefill(params, step_params, batch, slots):
    # The whole prompt is the prefix (full attention), as in the trainer's layout; under
    # config.model.attention='causal' embed_inputs ignores this and returns mask_ar = 1
    # everywhere, so the prompt is causal, as in the forward pass the trainer runs.
    batch = dict(batch, mask_ar=jnp.zeros_like(batch["tokens"]))
    e0, input_mask, mask_ar = model.apply({"params": params}, batch,
                                          method=vlm.VLM.embed_inputs)
    b, n, _ = e0.shape
    mask = jnp.pad(layers.prefix_lm_mask(input_mask, mask_ar),
                   ((0, 0), (0, 0), (0, 0), (0, slots - n)))
    positions = layers.positions_from_mask(input_mask)
    cache = _empty_cache(model, b, depth, slots, e0.dtype)
    nv = n - batch["tokens"].shape[1]
    last = nv + jnp.sum(batch["input_mask"], axis=1) - 1           # the last prompt token

    def body(e, kv):
      e_next, (h, _), kv = run_step(step_params, e, e0, mask, positions, kv, 0, None)
      h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)
      return e_next, (head(params, h_last), kv)

    _, (logits, cache) = jax.lax.scan(body, e0, cache)             # logits [r, B, V]
    valid = jnp.pad(input_mask > 0, ((0, 0), (0, slots - n)))
    return logits, cache, valid, jnp.sum(input_mask, axis=1)

  def extend(params, step_params, cache, token, slot, pos, valid):
    """Runs one token per row through up to `depth` steps; returns (logits, steps, cache)."""
    b = token.shape[0]
    e0 = model.apply({"params": params}, token[:, None], method=vlm.VLM.embed_text)
    mask = valid[:, None, None, :]
    positions = pos[:, None]

    def run(e, cache_s):
      e_next, (h, _), cache_s = run_step(step_params, e, e0, mask, positions, cache_s, slot, 0)
      return e_next, h, cache_s

    if adaptive is None:
      # cache[step][layer] (_split_steps): the steps are unrolled, each updating its own
      # buffers in place. A fixed depth reads only the last step's prediction: the head
      # (vocab x width, the largest matmul of a real-sized model at one token) runs once.
      cache, e = list(cache), e0
      for s in range(depth):
        e, h, cache[s] = run(e, cache[s])
      return head(params, h), jnp.full((b,), depth, jnp.int32), tuple(cache)

    # Adaptive exit: a loop over the steps that stops once every row has exited, on the
    # prefill's layout (per layer, every step's keys / values stacked). Indexing the
    # step copies its cache out and back. Unrolled steps would each need a lax.cond,
    # and XLA copies a conditional's buffers too (measured 1.05-1.2x slower).
    def cond(carry):
      s, _, _, state = carry
      return (s < depth) & ~jnp.all(state[0])

    def body(carry):
      s, e, cache, state = carry
      e_next, h, cache_s = run(e, tuple((k[s], v[s]) for k, v in cache))
      cache = tuple(tuple(jax.lax.dynamic_update_index_in_dim(c, new, s, 0)
                          for c, new in zip(kv, new_kv)) for kv, new_kv in zip(cache, cache_s))
      state = _exit_update(state, head(params, h), s, s == depth - 1, adaptive)
      return s + 1, e_next, cache, state

    vocab = model.cfg.vocab_size
    state = (jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
             jnp.zeros((b, vocab), jnp.float32), jnp.full((b,), -1), jnp.zeros((b,), jnp.int32))
    _, _, cache, state = jax.lax.while_loop(cond, body, (0, e0, cache, state))
    _, exit_step, logits, _, _ = state
    return logits, exit_step + 1, _reuse_exit_kv(cache, exit_step, slot)

  def generate(params, batch, rng, eos_id):
    t_prompt = batch["tokens"].shape[1]
    slots_prompt = vlm.num_image_tokens(model.cfg) + t_prompt
    slots = slots_prompt + max_new_tokens
    step_params = _step_params(params)
    prefill_logits, cache, valid, n_real = prefill(params, step_params, batch, slots)
    if adaptive is None:
      cache = _split_steps(cache)
    b = n_real.shape[0]
    # The first answer token: the prompt's last position, exiting by the same rule.
    state = (jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
             jnp.zeros(prefill_logits.shape[1:], jnp.float32), jnp.full((b,), -1),
             jnp.zeros((b,), jnp.int32))
    for s in range(depth):
      state = _exit_update(state, prefill_logits[s], s, s == depth - 1, adaptive)
    logits0, steps0 = state[2], state[1] + 1
    rng, sub = jax.random.split(rng)
    tok0 = _select(logits0, sub, sampling)
    tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok0)
    steps = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(steps0)
    all_logits = (jnp.zeros((b, max_new_tokens, logits0.shape[-1]), jnp.float32)
                  .at[:, 0].set(logits0) if return_logits else None)
    done = tok0 == eos_id

    def cond(carry):
      t, _, _, _, _, done, _, _ = carry
      return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      t, cache, valid, tokens, steps, done, all_logits, rng = carry
      slot = slots_prompt + t - 1
      valid = jax.lax.dynamic_update_index_in_dim(valid, jnp.ones((b,), bool), slot, 1)
      logits, used, cache = extend(params, step_params, cache, tokens[:, t - 1], slot,
                                   n_real + t - 1, valid)
      rng, sub = jax.random.split(rng)
      tok = jnp.where(done, 0, _select(logits, sub, sampling))
      tokens = jax.lax.dynamic_update_index_in_dim(tokens, tok, t, 1)
      steps = jax.lax.dynamic_update_index_in_dim(steps, jnp.where(done, 0, used), t, 1)
      if all_logits is not None:
        all_logits = jax.lax.dynamic_update_index_in_dim(all_logits, logits, t, 1)
      return t + 1, cache, valid, tokens, steps, done | (tok == eos_id), all_logits, rng

    carry = (1, cache, valid, tokens, steps, done, all_logits, rng)
    _, _, _, tokens, steps, _, all_logits, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, steps, all_logits

  return jax.jit(generate)


def _reuse_exit_kv(cache, exit_step, slot):
  """cache: per layer, (keys [r, B * K, D, S], values [r, B * K, S, D]). At `slot`, steps
  after each row's exit step get copies of the exit step's keys / values (the
  adaptive-exit rule)."""
  depth, num_rows = cache[0][0].shape[:2]
  # Each cache row is a (batch row, KV head) pair, row-major: [B * K] exit steps.
  rows = jnp.repeat(exit_step, num_rows // exit_step.shape[0])
  later = jnp.arange(depth)[:, None] > rows[None, :]                  # [r, B * K]

  def reuse(c, axis):
    col = jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=axis)         # [r, B * K, ...]
    expand = lambda x: x.reshape(x.shape + (1,) * (col.ndim - 2))     # noqa: E731
    at_exit = jnp.take_along_axis(col, expand(rows[None]), axis=0)
    return jax.lax.dynamic_update_slice_in_dim(c, jnp.where(expand(later), at_exit, col),
                                               slot, axis=axis)

  return tuple(tuple(reuse(c, axis + 1) for c, axis in zip(kv, layers.KV_CACHE_SLOT_AXES))
               for kv in cache)


_COMPILED = {}


def generate(model, params, batch, *, depth, max_new_tokens, eos_id, sampling=Sampling(),
             rng=None, adaptive=None, return_logits=False):
  """Answers the prompts in `batch` (see the module docstring); returns a Generation."""
  check_depth(model, depth)
  sampling.check()
  if adaptive is not None:
    adaptive.check()
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be >= 1")
  missing = [k for k in PROMPT_KEYS if k not in batch]
  if missing:
    raise ValueError(f"decode batch lacks {missing}; it needs {PROMPT_KEYS}")
  if sampling.temperature > 0 and rng is None:
    raise ValueError("sampling with temperature > 0 needs an rng (a jax PRNG key)")
  # Models built from equal configs share one program (jit caches it per input shapes).
  key = (model.cfg, int(depth), int(max_new_tokens), sampling, adaptive, bool(return_logits))
  if key not in _COMPILED:
    _COMPILED[key] = _generate_fn(model, int(depth), int(max_new_tokens), sampling, adaptive,
                                  return_logits)
  fn = _COMPILED[key]
  prompts = {k: jnp.asarray(batch[k]) for k in PROMPT_KEYS}
  rng = jax.random.PRNGKey(0) if rng is None else rng
  tokens, steps, logits = jax.device_get(fn(params, prompts, rng, jnp.int32(eos_id)))
  tokens, steps = np.asarray(tokens), np.asarray(steps)
  is_eos = tokens == eos_id
  lengths = np.where(is_eos.any(1), is_eos.argmax(1), tokens.shape[1]).astype(np.int32)
  return Generation(tokens=tokens, lengths=lengths, steps_used=steps,
                    logits=None if logits is None else np.asarray(logits))


# ---- the reference: the same answer without a cache -------------------------------------


def full_sequence(batch, answer_tokens):
  """The trainer's layout of prompt + answer: the prompt (right-padded, mask_ar 0), then
  `answer_tokens` [B, n] (causal). Prompt padding stays in the middle, masked."""
  tokens = np.asarray(batch["tokens"])
  answer = np.asarray(answer_tokens, np.int32)
  b, n = answer.shape
  return dict(
      image=batch["image"], image_mask=batch["image_mask"],
      tokens=np.concatenate([tokens, answer], 1),
      input_mask=np.concatenate([np.asarray(batch["input_mask"]), np.ones((b, n), np.int32)], 1),
      mask_ar=np.concatenate([np.zeros_like(tokens), np.ones((b, n), np.int32)], 1))


def recompute_logits(model, params, batch, answer_tokens, depth):
  """Logits [r, B, n, V] for each answer token at every step 1..depth, by one full
  forward pass over prompt + answer (no cache): row b's i-th answer token is predicted
  from the position before it (the last prompt token for i = 0)."""
  seq = full_sequence(batch, answer_tokens)
  out = model.apply({"params": params}, {k: jnp.asarray(v) for k, v in seq.items()},
                    num_steps=depth)
  hidden = out["hidden"]                                           # [r, B, T + n, d]
  t = np.asarray(batch["tokens"]).shape[1]
  n = np.asarray(answer_tokens).shape[1]
  last = np.asarray(batch["input_mask"]).sum(1) - 1                 # [B]
  idx = np.concatenate([last[:, None], t + np.arange(n - 1)[None].repeat(len(last), 0)], 1)
  h = jnp.take_along_axis(hidden, jnp.asarray(idx)[None, :, :, None], axis=2)
  return model.apply({"params": params}, h, method=vlm.VLM.logits)
