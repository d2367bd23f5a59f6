"""rvlm/decode.py: cached decoding against full recomputation, depth, adaptive exit,
sampling, eos, bf16 and sharded params.

The reference is `decode.recompute_logits`: the model's ordinary forward pass (the one
the trainer uses) over prompt + answer, without a cache. Tolerances: float32 logits
within 1e-4 absolute (measured about 3e-7); bfloat16 within 0.1 (its 8-bit mantissa).
"""
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import debug
from rvlm import decode
from rvlm import sharding as sharding_lib
from rvlm import train
from rvlm.models import vlm

F32_TOL = 1e-4


# The options for importing Hugging Face checkpoints, all on: fully causal attention
# (image and prompt included), decoder biases, no ViT final norm, exact-GELU projector.
HF_OPTIONS = dict(attention="causal", decoder=dict(qkv_bias=True, out_bias=True, mlp_bias=True),
                  vit=dict(final_norm=False, norm_eps=1e-5), projector=dict(act="gelu"))


@functools.lru_cache(maxsize=None)
def make(mode="connector", steps=3, dtype="float32", hf=False, kv_heads=1):
  """(config, model, params); cached, so that tests share compiled decoding programs.
  hf: with HF_OPTIONS, and random (not zero-initialised) biases. kv_heads: KV heads,
  each shared by two query heads."""
  c = debug.get_config()
  c.model.recursion.update(mode=mode, num_steps=steps)
  c.model.decoder.update(num_heads=2 * kv_heads, num_kv_heads=kv_heads)
  c.model.dtype = dtype
  # A random (not zero) connector projection, so that every step changes the answer.
  c.model.connector.update(init="normal", alpha_init=1.0)
  if hf:
    c.model.attention = HF_OPTIONS["attention"]
    for part in ("decoder", "vit", "projector"):
      c.model[part].update(HF_OPTIONS[part])
  model = vlm.make_model(c.model)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), train.dummy_batch(c, 1))["params"])
  if hf:
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype)
                         if jax.tree_util.keystr(path).endswith("['bias']") else x), params)
  return c, model, params


def ragged_batch(c, lens=(3, 6, 2), seed=0, with_image=(1, 1, 0)):
  rng = np.random.default_rng(seed)
  b, t, s = len(lens), max(lens), c.model.vit.image_size
  tokens = np.zeros((b, t), np.int32)
  mask = np.zeros((b, t), np.int32)
  for i, n in enumerate(lens):
    tokens[i, :n] = rng.integers(5, c.model.vocab_size, n)
    tokens[i, 0] = 1  # bos
    mask[i, :n] = 1
  return dict(image=rng.normal(size=(b, s, s, 3)).astype(np.float32),
              image_mask=np.asarray(with_image, np.int32), tokens=tokens, input_mask=mask)


def check_against_recompute(model, params, batch, depth, tol=F32_TOL, **kw):
  gen = decode.generate(model, params, batch, depth=depth, max_new_tokens=5, eos_id=-1,
                        return_logits=True, **kw)
  ref = np.asarray(decode.recompute_logits(model, params, batch, gen.tokens, depth))
  assert_greedy_like(gen, ref[-1], tol)
  assert (gen.steps_used == depth).all()
  return gen, ref


def assert_greedy_like(gen, ref_logits, tol):
  """gen's logits within tol of the reference's, and its greedy tokens the reference's
  argmax wherever rounding cannot swap the top two: a top-2 margin above twice the
  largest logit difference (bf16 logits have exact ties)."""
  np.testing.assert_allclose(gen.logits, ref_logits, atol=tol, rtol=0)
  err = np.abs(gen.logits - ref_logits).max()
  top2 = np.sort(ref_logits, axis=-1)[..., -2:]
  decided = top2[..., 1] - top2[..., 0] > 2 * err
  assert decided.mean() >= 0.75, (decided.mean(), err)
  np.testing.assert_array_equal(gen.tokens[decided], ref_logits.argmax(-1)[decided])


@pytest.mark.parametrize("mode,depths", [("none", (1,)), ("vanilla", (1, 2, 3, 4)),
                                         ("connector", (1, 2, 3, 4, 6))])
def test_cached_decoding_equals_full_recomputation_at_every_depth(mode, depths):
  """Token for token and logit for logit, ragged prompts, with and without images: the
  cached decode at depth r equals step r of the trainer's forward pass over the same
  text (teacher forcing), also beyond the trained R = 3."""
  c, model, params = make(mode, 1 if mode == "none" else 3)
  batch = ragged_batch(c)
  answers = set()
  for depth in depths:
    gen = decode.generate(model, params, batch, depth=depth, max_new_tokens=5, eos_id=-1,
                          return_logits=True)
    ref = np.asarray(decode.recompute_logits(model, params, batch, gen.tokens, max(depths)))
    np.testing.assert_allclose(gen.logits, ref[depth - 1], atol=F32_TOL, rtol=0)
    np.testing.assert_array_equal(gen.tokens, ref[depth - 1].argmax(-1))
    assert (gen.steps_used == depth).all()
    answers.add(gen.tokens.tobytes())
  assert len(answers) == len(depths) or len(answers) >= 3  # the depths do differ


def test_causal_attention_and_hf_options_cached_decoding_equals_recomputation():
  """With config.model.attention='causal' (and the other HF-import options on), the
  prefill's prompt is causal like the forward pass's: cached decoding (depth 2, two
  recursion steps) equals recomputation over the full sequence. Not vacuous: the same
  params under 'prefix' attention give other logits."""
  c, model, params = make("connector", 3, hf=True)
  batch = ragged_batch(c)
  gen, _ = check_against_recompute(model, params, batch, 2)
  prefix_cfg = c.model.copy_and_resolve_references()
  prefix_cfg.attention = "prefix"
  prefix = np.asarray(decode.recompute_logits(vlm.make_model(prefix_cfg), params, batch,
                                              gen.tokens, 2))
  assert np.abs(prefix[-1] - gen.logits).max() > 1e-2


def test_several_kv_heads_cached_decoding_and_adaptive_exit():
  """Two KV heads (each shared by two query heads): the cache holds one row per (prompt,
  KV head), and decoding still equals recomputation at a fixed depth; exiting at step 1
  copies step 1's keys and values into every later step's slots (each row's, each
  head's), so the answer is depth 1's."""
  c, model, params = make("connector", 3, kv_heads=2)
  assert c.model.decoder.num_kv_heads == 2
  batch = ragged_batch(c)
  for depth in (1, 3):
    check_against_recompute(model, params, batch, depth)
  depth1 = decode.generate(model, params, batch, depth=1, max_new_tokens=5, eos_id=-1)
  first = decode.generate(model, params, batch, depth=3, max_new_tokens=5, eos_id=-1,
                          adaptive=decode.Adaptive(threshold=1e-9))
  np.testing.assert_array_equal(first.tokens, depth1.tokens)
  assert (first.steps_used == 1).all()


def test_eos_stops_a_row_and_pads_after_it():
  c, model, params = make("connector", 3)
  batch = ragged_batch(c)
  free = decode.generate(model, params, batch, depth=2, max_new_tokens=5, eos_id=-1)
  eos = int(free.tokens[0, 2])  # row 0's third token plays eos
  gen = decode.generate(model, params, batch, depth=2, max_new_tokens=5, eos_id=eos)
  first = [list(r).index(eos) if eos in r else 5 for r in free.tokens]
  for i, k in enumerate(first):
    np.testing.assert_array_equal(gen.tokens[i, :k + 1], free.tokens[i, :k + 1])
    assert (gen.tokens[i, k + 1:] == 0).all() and (gen.steps_used[i, k + 1:] == 0).all()
    assert gen.lengths[i] == k
  assert first[0] <= 2 and (gen.tokens != free.tokens).any()


def test_adaptive_exit():
  c, model, params = make("connector", 3)
  batch = ragged_batch(c)
  full = decode.generate(model, params, batch, depth=3, max_new_tokens=5, eos_id=-1,
                         return_logits=True)
  # Never triggered: the full depth, the same answer.
  never = decode.generate(model, params, batch, depth=3, max_new_tokens=5, eos_id=-1,
                          adaptive=decode.Adaptive(threshold=1.0))
  np.testing.assert_array_equal(never.tokens, full.tokens)
  assert never.mean_steps() == 3.0
  # Always triggered at step 1: every later step reads step 1's keys and values for
  # every generated token, so the answer is the depth-1 answer.
  depth1 = decode.generate(model, params, batch, depth=1, max_new_tokens=5, eos_id=-1,
                           return_logits=True)
  first = decode.generate(model, params, batch, depth=3, max_new_tokens=5, eos_id=-1,
                          adaptive=decode.Adaptive(threshold=1e-9))
  np.testing.assert_array_equal(first.tokens, depth1.tokens)
  assert (first.steps_used == 1).all()
  # The stability rule: exits after exactly 2 steps when the argmax does not move.
  stable = decode.generate(model, params, batch, depth=3, max_new_tokens=5, eos_id=-1,
                           adaptive=decode.Adaptive(threshold=1.0, stable_steps=2),
                           return_logits=True)
  assert set(np.unique(stable.steps_used)) <= {2, 3}
  assert 1 <= stable.mean_steps() <= 3


def test_exit_kv_rule():
  """Steps after a row's exit step hold copies of the exit step's keys/values at the slot."""
  rng = np.random.default_rng(0)
  cache = rng.normal(size=(4, 2, 2, 3, 2, 5, 2)).astype(np.float32)   # [r, L, k|v, B, K, S, D]
  exit_step = np.array([0, 2, 3], np.int32)
  # The adaptive loop's layout: per layer, (k [r, B * K, D, S], v [r, B * K, S, D]).
  layout = tuple((cache[:, l, 0].reshape(4, 6, 5, 2).transpose(0, 1, 3, 2),
                  cache[:, l, 1].reshape(4, 6, 5, 2)) for l in range(2))
  out = decode._reuse_exit_kv(layout, exit_step, 3)  # pylint: disable=protected-access
  out = np.stack([np.stack([np.asarray(k).transpose(0, 1, 3, 2).reshape(4, 3, 2, 5, 2),
                            np.asarray(v).reshape(4, 3, 2, 5, 2)], 1) for k, v in out], 1)
  # As [r, L x (k|v), B, K, S, D]: the slot axis is 4, the rows' axis 2.
  cache, out = cache.reshape(4, 4, 3, 2, 5, 2), out.reshape(4, 4, 3, 2, 5, 2)
  for b, s in enumerate(exit_step):
    for r in range(4):
      want = cache[s, :, b, :, 3] if r > s else cache[r, :, b, :, 3]
      np.testing.assert_array_equal(out[r, :, b, :, 3], want)
  np.testing.assert_array_equal(np.delete(out, 3, axis=4), np.delete(cache, 3, axis=4))


def test_sampling():
  c, model, params = make("connector", 3)
  batch = ragged_batch(c)
  greedy = decode.generate(model, params, batch, depth=2, max_new_tokens=5, eos_id=-1)
  key = jax.random.PRNGKey(3)
  run = lambda **s: decode.generate(model, params, batch, depth=2, max_new_tokens=5,  # noqa: E731
                                    eos_id=-1, sampling=decode.Sampling(**s), rng=key).tokens
  np.testing.assert_array_equal(run(temperature=1.0, top_k=1), greedy.tokens)
  np.testing.assert_array_equal(run(temperature=1.0, top_p=1e-6), greedy.tokens)
  hot = run(temperature=5.0)
  np.testing.assert_array_equal(hot, run(temperature=5.0))          # same seed, same answer
  assert (hot != greedy.tokens).any()                                # and it does sample
  with pytest.raises(ValueError, match="rng"):
    decode.generate(model, params, batch, depth=2, max_new_tokens=5, eos_id=-1,
                    sampling=decode.Sampling(temperature=1.0))



@pytest.mark.parametrize("mode", ["none", "connector"])
def test_prepared_params_decode_the_same(mode):
  """decode.prepare_params (the step sliced per layer and per modality once, for many
  calls) gives the same tokens and logits as the stacked params generate slices itself."""
  depth = 1 if mode == "none" else 2
  c, model, params = make(mode, depth)
  batch = ragged_batch(c)
  prepared = decode.prepare_params(params)
  step = prepared["recursion"]["step"]
  assert sorted(step["stack"]) == [f"layer_{i}" for i in range(c.model.decoder.depth)]
  if mode == "connector":
    assert "proj" not in step["connector"] and "proj_1" in step["connector"]
  np.testing.assert_array_equal(prepared["embed"]["embedding"], params["embed"]["embedding"])
  run = lambda p: decode.generate(model, p, batch, depth=depth, max_new_tokens=4,  # noqa: E731
                                  eos_id=-1, return_logits=True)
  a, b = run(params), run(prepared)
  np.testing.assert_array_equal(b.tokens, a.tokens)
  np.testing.assert_allclose(b.logits, a.logits, rtol=1e-6, atol=1e-6)
  # Prepared twice is prepared once.
  again = decode.prepare_params(prepared)
  assert jax.tree.structure(again) == jax.tree.structure(prepared)


def test_bfloat16_and_sharded_params():
  c, model, params = make("connector", 2, dtype="bfloat16")
  batch = ragged_batch(c, lens=(4, 4, 2, 3, 5, 2, 3, 4), with_image=(1,) * 8)
  check_against_recompute(model, params, batch, 2, tol=0.1)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding_lib.make_mesh(c.mesh)
  rules = sharding_lib.rules_from_config(c.mesh)
  init = lambda key: model.init(key, train.dummy_batch(c, 1))["params"]  # noqa: E731
  _, shardings = sharding_lib.abstract_state_and_shardings(init, mesh, rules,
                                                           jax.random.PRNGKey(0))
  sharded = jax.device_put(params, shardings)
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
             for x in jax.tree.leaves(sharded))
  # Against its own reference, not the unsharded run's tokens: sharded bf16 rounds
  # differently, and one exact tie in the greedy choice changes the rest of that row.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    again = decode.generate(model, sharded, batch, depth=2, max_new_tokens=5, eos_id=-1,
                            return_logits=True)
  assert_greedy_like(again, np.asarray(
      decode.recompute_logits(model, params, batch, again.tokens, 2))[-1], tol=0.1)


def test_bad_arguments():
  c, model, params = make("none", 1)
  batch = ragged_batch(c)
  with pytest.raises(ValueError, match="depth 1 only"):
    decode.generate(model, params, batch, depth=2, max_new_tokens=2, eos_id=2)
  with pytest.raises(ValueError, match="depth=0"):
    decode.generate(model, params, batch, depth=0, max_new_tokens=2, eos_id=2)
  with pytest.raises(ValueError, match="lacks"):
    decode.generate(model, params, {"tokens": batch["tokens"]}, depth=1, max_new_tokens=2,
                    eos_id=2)
  with pytest.raises(ValueError, match="threshold"):
    decode.generate(model, params, batch, depth=1, max_new_tokens=2, eos_id=2,
                    adaptive=decode.Adaptive(threshold=0.0))
  with pytest.raises(ValueError, match="top_p"):
    decode.generate(model, params, batch, depth=1, max_new_tokens=2, eos_id=2,
                    sampling=decode.Sampling(temperature=1.0, top_p=0.0), rng=jax.random.PRNGKey(0))
