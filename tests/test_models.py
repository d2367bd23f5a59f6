"""Model behaviour: recursion shares params, scan == loop, masks, connector properties."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rvlm import losses
from rvlm import optim
from rvlm import sharding
from rvlm.models import connector
from rvlm.models import decoder as decoder_lib
from rvlm.models import layers
from rvlm.models import presets, vlm

B, T = 2, 10
PREFIX = 5  # bos + prompt tokens; the rest is the causal answer part


def make_batch(cfg, seed=0, b=B, t=T):
  rng = np.random.default_rng(seed)
  s = cfg.vit.image_size
  mask_ar = np.zeros((b, t), np.int32)
  mask_ar[:, PREFIX:] = 1
  input_mask = np.ones((b, t), np.int32)
  input_mask[1, t - 2:] = 0  # padding on the second example
  mask_loss = mask_ar * input_mask
  return dict(
      image=jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
      image_mask=jnp.ones((b,), jnp.int32),
      tokens=jnp.asarray(rng.integers(1, cfg.vocab_size, (b, t)), jnp.int32),
      input_mask=jnp.asarray(input_mask), mask_ar=jnp.asarray(mask_ar),
      mask_loss=jnp.asarray(mask_loss))


def tiny(mode="connector", steps=3, **overrides):
  cfg = presets.tiny()
  cfg.recursion.mode = mode
  cfg.recursion.num_steps = steps
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return cfg


def init(cfg, seed=0):
  model = vlm.make_model(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), make_batch(cfg))["params"])
  return model, params


def forward(model, params, batch, **kwargs):
  """Jitted forward (eager flax scans are slow and reorder float sums)."""
  return jax.jit(lambda p, b: model.apply({"params": p}, b, **kwargs))(params, batch)


def logits_of(model, params, hidden):
  return jax.jit(lambda p, h: model.apply({"params": p}, h, method=model.logits))(params, hidden)


def randomize(params, seed=1, scale=0.3):
  """Random values for every leaf (the connector starts at zero; tests need it live)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


def abstract_count(cfg):
  model = vlm.make_model(cfg)
  batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(cfg))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  return count(nn.unbox(shapes["params"]))


# ---- parameter sharing -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vanilla", "connector"])
def test_param_count_independent_of_num_steps(mode):
  counts = {r: abstract_count(tiny(mode, r)) for r in (1, 2, 4, 8)}
  assert len(set(counts.values())) == 1, counts


def test_standard_and_vanilla_have_the_same_params():
  # mode 'none' is defined only for R = 1; vanilla adds no params at any R.
  assert abstract_count(tiny("none", 1)) == abstract_count(tiny("vanilla", 4))


# ---- scan and loop -----------------------------------------------------------------


@pytest.mark.parametrize("mode,remat", [("vanilla", False), ("connector", False),
                                        ("connector", True)])
def test_scan_and_loop_recursion_agree(mode, remat):
  """Equal outputs and gradients; tolerance 1e-6 abs/rel (float32, same op order).

  remat: the loop checkpoints each step (recursion.remat) and the scan does not, so
  the recomputed backward pass is checked against the stored one too."""
  cfg_scan = tiny(mode, 3)
  cfg_loop = tiny(mode, 3, **{"recursion.impl": "loop", "recursion.remat": remat})
  model_s, params = init(cfg_scan)
  model_l, params_l = init(cfg_loop)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_l)
  params = randomize(params)
  batch = make_batch(cfg_scan)

  def loss(model, p):
    out = model.apply({"params": p}, batch)
    tok, _ = losses.per_step_token_losses(
        lambda h: model.apply({"params": p}, h, method=model.logits), out["hidden"], batch["tokens"])
    return losses.recursion_loss(tok, batch["mask_loss"][:, 1:])[0], out["hidden"]

  grad = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(m, p), has_aux=True))  # noqa: E731
  (ls, hs), gs = grad(model_s)(params)
  (ll, hl), gl = grad(model_l)(params)
  # Under jit both compile to the same arithmetic: outputs measured bit-identical on CPU.
  # The stated tolerance (1e-6 outputs, 1e-5 gradients, relative) leaves room for
  # backends that fuse the unrolled loop differently.
  np.testing.assert_allclose(hs, hl, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ls, ll, rtol=1e-6)
  # The recomputed forward is fused differently: gradients then differ by up to 2.5e-6
  # (measured, on entries near zero), so remat gets atol 1e-5.
  for a, b in zip(jax.tree_util.tree_leaves(gs), jax.tree_util.tree_leaves(gl)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 if remat else 1e-6)


def test_scanned_and_unrolled_layers_agree():
  model_s, params = init(tiny("connector", 2))
  model_u, params_u = init(tiny("connector", 2, scan_layers=False))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_u)
  params = randomize(params)
  batch = make_batch(presets.tiny())
  np.testing.assert_allclose(forward(model_s, params, batch)["hidden"],
                             forward(model_u, params, batch)["hidden"], rtol=1e-6, atol=1e-6)



def test_layerwise_stack_with_sliced_params_equals_the_stacked_one():
  """rvlm/decode.py's stack: one submodule per layer, params sliced out of the stacked
  tree by layerwise_params; the same outputs (sampled layers included) and the same
  updated KV cache as the scanned stack."""
  cfg = tiny("connector", 1)
  model, params = init(cfg)
  stack_params = randomize(params)["recursion"]["step"]["stack"]
  dec = cfg.decoder
  kwargs = dict(vlm.step_kwargs(cfg)["stack_kwargs"], num_sampled=2)
  scanned = decoder_lib.DecoderStack(**kwargs)
  layerwise = decoder_lib.DecoderStack(**kwargs, layerwise=True)
  sliced = decoder_lib.layerwise_params(stack_params)
  assert sorted(sliced) == [f"layer_{i}" for i in range(dec.depth)]
  own = nn.unbox(jax.eval_shape(layerwise.init, jax.random.PRNGKey(0),
                                jnp.zeros((1, 3, dec.width)), jnp.ones((1, 1, 3, 3), bool),
                                jnp.zeros((1, 3), jnp.int32))["params"])
  assert jax.tree.map(jnp.shape, sliced) == jax.tree.map(jnp.shape, own)
  rng = np.random.default_rng(0)
  b, n, slots = 2, 3, 7
  x = jnp.asarray(rng.normal(size=(b, n, dec.width)), jnp.float32)
  positions = jnp.broadcast_to(jnp.arange(n), (b, n))
  # The decoding cache's layouts, per layer stacked: k [L, B * K, D, S], v [L, B * K, S, D].
  shapes = layers.kv_cache_shapes(b, dec.num_kv_heads, dec.head_dim, slots)
  for kv_cache in (None, tuple(jnp.asarray(rng.normal(size=(dec.depth,) + shape), jnp.float32)
                               for shape in shapes)):
    mask = jnp.ones((b, 1, n, n if kv_cache is None else slots), bool)
    args = (x, mask, positions, kv_cache, None if kv_cache is None else 2)
    want = jax.jit(scanned.apply)({"params": stack_params}, *args)
    # The layerwise stack's cache: one (k, v) pair per layer, taken and returned.
    per_layer = None if kv_cache is None else tuple(zip(*kv_cache))
    got = jax.jit(layerwise.apply)({"params": sliced}, *args[:3], per_layer, args[4])
    assert len(got) == len(want) == (2 if kv_cache is None else 3)
    if kv_cache is not None:
      assert len(got[2]) == dec.depth and all(len(kv) == 2 for kv in got[2])
      got = (*got[:2], tuple(map(jnp.stack, zip(*got[2]))))
    # Both jitted (op by op, the eager one rounds differently): equal to the bit with
    # jax 0.10.2 on CPU, values up to ~65; the tolerance leaves room for other fusions.
    for a, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-6)


# ---- R = 1 equals a plain forward ----------------------------------------------------


def test_r1_modes_equal_plain_forward():
  cfg = tiny("none", 1)
  model, params = init(cfg)
  params = randomize(params)
  batch = make_batch(cfg)
  # The plain, non-recursive forward: embeddings -> one decoder stack -> head.
  e0, input_mask, mask_ar = jax.jit(lambda p: model.apply({"params": p}, batch, method=model.embed_inputs))(params)
  dec = cfg.decoder
  stack = decoder_lib.DecoderStack(dec.width, dec.depth, dec.num_heads, dec.num_kv_heads,
                                   dec.head_dim, dec.mlp_dim, dec.rope_theta, dec.norm_eps)
  h, _ = stack.apply({"params": params["recursion"]["step"]["stack"]}, e0,
                     layers.prefix_lm_mask(input_mask, mask_ar), layers.positions_from_mask(input_mask))
  nv = e0.shape[1] - T
  plain = logits_of(model, params, h[:, nv:])

  for mode in ("none", "vanilla", "connector"):
    m, p = init(tiny(mode, 1))
    # Same decoder / encoder params; the connector (if any) keeps its own.
    p = {**p, **{k: v for k, v in params.items() if k != "recursion"}}
    p["recursion"] = {"step": {**p["recursion"]["step"], "stack": params["recursion"]["step"]["stack"]}}
    out = forward(m, p, batch)["hidden"]
    assert out.shape[0] == 1
    np.testing.assert_allclose(logits_of(m, p, out[0]), plain, rtol=1e-5, atol=1e-5)


# ---- masks -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "vanilla", "connector"])
def test_later_answer_token_never_changes_earlier_logits(mode):
  cfg = tiny(mode, 1 if mode == "none" else 3)
  model, params = init(cfg)
  params = randomize(params)
  batch = make_batch(cfg)
  pos = PREFIX + 2
  changed = dict(batch, tokens=batch["tokens"].at[:, pos].set((batch["tokens"][:, pos] + 1) % cfg.vocab_size))
  logits = lambda b: logits_of(model, params, forward(model, params, b)["hidden"])  # noqa: E731
  a, c = logits(batch), logits(changed)
  np.testing.assert_array_equal(a[:, :, :pos], c[:, :, :pos])
  assert np.abs(a[:, :, pos:] - c[:, :, pos:]).max() > 1e-4  # later positions do see it
  # A prefix token is visible to the whole prefix (full attention), also to earlier tokens.
  changed = dict(batch, tokens=batch["tokens"].at[:, 3].set((batch["tokens"][:, 3] + 1) % cfg.vocab_size))
  assert np.abs(logits(changed)[:, :, 1] - a[:, :, 1]).max() > 1e-4


def test_causal_attention_makes_image_and_prompt_causal():
  """config.model.attention='causal' ignores the batch's prefix: a prompt token no longer
  reaches earlier tokens, and the image tokens (all step inputs, connector mode) no
  longer depend on the text, while under 'prefix' both do."""
  cfg = tiny("connector", 2, attention="causal")
  params = random_params(cfg)
  nv = vlm.num_image_tokens(cfg)
  batch = make_batch(cfg)
  changed = batch["tokens"].at[:, 3].set((batch["tokens"][:, 3] + 1) % cfg.vocab_size)
  # One forward pass per model over both versions (rows B.. are the changed ones).
  both = {k: jnp.concatenate([v, changed if k == "tokens" else v]) for k, v in batch.items()}
  for m, causal in ((vlm.make_model(cfg), True), (vlm.make_model(tiny("connector", 2)), False)):
    out = jax.jit(lambda p, b, m=m: m.apply({"params": p}, b))(params, both)
    logits = np.asarray(logits_of(m, params, out["hidden"]))
    la, lc = logits[:, :B], logits[:, B:]
    a = {"step_inputs": np.asarray(out["step_inputs"])[:, :B]}
    c = {"step_inputs": np.asarray(out["step_inputs"])[:, B:]}
    assert np.abs(la[:, :, 3:] - lc[:, :, 3:]).max() > 1e-4   # later tokens see it
    earlier = [np.abs(la[:, :, :3] - lc[:, :, :3]).max(),
               np.abs(a["step_inputs"][:, :, :nv] - c["step_inputs"][:, :, :nv]).max()]
    if causal:
      assert earlier == [0, 0], earlier
    else:
      assert min(earlier) > 1e-4, earlier


def test_image_less_examples_ignore_the_image():
  cfg = tiny("connector", 2)
  model, params = init(cfg)
  params = randomize(params)
  batch = dict(make_batch(cfg), image_mask=jnp.zeros((B,), jnp.int32))
  other = dict(batch, image=-batch["image"])
  out = lambda b: forward(model, params, b)["hidden"]  # noqa: E731
  np.testing.assert_array_equal(out(batch), out(other))


# ---- the connector -------------------------------------------------------------------


def test_zero_init_connector_reproduces_step_one_input():
  cfg = tiny("connector", 3)
  model, params = init(cfg)
  inputs = forward(model, params, make_batch(cfg))["step_inputs"]
  np.testing.assert_array_equal(inputs[1], inputs[0])
  np.testing.assert_array_equal(inputs[2], inputs[0])


@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_alpha_zero_reproduces_step_one_input(projection):
  cfg = tiny("connector", 2, **{"connector.projection": projection})
  model, params = init(cfg)
  params = randomize(params)
  params["recursion"]["step"]["connector"]["alpha"] = jnp.zeros_like(
      params["recursion"]["step"]["connector"]["alpha"])
  inputs = forward(model, params, make_batch(cfg))["step_inputs"]
  np.testing.assert_array_equal(inputs[1], inputs[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_connector_mean_over_layers_is_jnp_mean_to_the_bit(k, dtype):
  # The chain of adds replaces jnp.mean for speed only (docs/performance.md): the
  # trained parameters, and so every recorded run, must not move by one ulp.
  x = jax.random.normal(jax.random.PRNGKey(k), (k, 3, 7, 16)).astype(dtype)
  mean = jax.jit(connector._mean_over_layers)(x)
  assert mean.dtype == dtype
  np.testing.assert_array_equal(np.asarray(mean, np.float32),
                                np.asarray(jax.jit(lambda v: jnp.mean(v, axis=0))(x), np.float32))


def test_connector_weights_are_modality_specific():
  cfg = tiny("connector", 2)
  nv = vlm.num_image_tokens(cfg)
  model, params = init(cfg)
  params = randomize(params)
  batch = make_batch(cfg)
  step2 = lambda p: forward(model, p, batch)["step_inputs"][1]  # noqa: E731
  base = step2(params)
  proj = params["recursion"]["step"]["connector"]["proj"]  # [k, modality, d, d]
  for m, changed_slice, fixed_slice in [(0, slice(0, nv), slice(nv, None)),
                                        (1, slice(nv, None), slice(0, nv))]:
    p = jax.tree_util.tree_map(lambda x: x, params)
    p["recursion"]["step"]["connector"]["proj"] = proj.at[:, m].add(0.5)
    out = step2(p)
    np.testing.assert_array_equal(out[:, fixed_slice], base[:, fixed_slice])
    assert np.abs(out[:, changed_slice] - base[:, changed_slice]).max() > 1e-3



@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_connector_with_split_modality_params_equals_the_joint_one(projection):
  """rvlm/decode.py's connector: each modality's kernels as params of their own, sliced
  by split_modality_params; the same output for image and text tokens."""
  k, b, n, d, nv = 4, 2, 5, 16, 2
  kwargs = dict(num_layers=k, num_image_tokens=nv, projection=projection, init="normal")
  rng = np.random.default_rng(0)
  sampled, e0 = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                 for shape in ((k, b, n, d), (b, n, d)))
  joint = connector.Connector(**kwargs)
  # Module.init by name: the connector's `init` field (its init scheme) shadows it.
  params = randomize(nn.Module.init(joint, jax.random.PRNGKey(0), sampled, e0, e0)["params"])
  split = connector.split_modality_params(nn.unbox(params))
  names = ["proj"] if projection == "linear" else ["proj_in", "proj_out"]
  assert sorted(x for x in split if x.startswith("proj")) == sorted(
      f"{name}_{m}" for name in names for m in (0, 1))
  split_module = connector.Connector(**kwargs, split_modalities=True)
  for num_image in (None, 0):                   # the prompt's layout, and a text chunk
    want = jax.jit(joint.apply, static_argnums=4)({"params": params}, sampled, e0, e0,
                                                  num_image)
    got = jax.jit(split_module.apply, static_argnums=4)({"params": split}, sampled, e0, e0,
                                                        num_image)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_shared_projection_option_has_one_modality():
  cfg = tiny("connector", 2, **{"connector.modality_specific": False})
  _, params = init(cfg)
  assert params["recursion"]["step"]["connector"]["proj"].shape[1] == 1


def test_sampled_layers_are_evenly_spaced():
  assert decoder_lib.sampled_layers(8, 4) == (2, 4, 6, 8)
  assert decoder_lib.sampled_layers(6, 4) == (2, 3, 5, 6)
  assert decoder_lib.sampled_layers(4, 1) == (4,)


def test_num_steps_override_gives_any_depth():
  cfg = tiny("connector", 3)
  model, params = init(cfg)
  params = randomize(params)
  batch = make_batch(cfg)
  full = forward(model, params, batch)["hidden"]
  short = forward(model, params, batch, num_steps=2)["hidden"]
  longer = forward(model, params, batch, num_steps=5)["hidden"]
  np.testing.assert_allclose(short, full[:2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(longer[:3], full, rtol=1e-6, atol=1e-6)
  assert longer.shape[0] == 5


# ---- real-scale presets (nothing allocated) -------------------------------------------


@pytest.mark.parametrize("name,target", [("1b", 1e9), ("3b", 3e9)])
def test_real_scale_preset_sizes(name, target):
  cfg = presets.get_preset(name)
  model = vlm.make_model(cfg)
  s = cfg.vit.image_size
  batch = dict(image=jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
               image_mask=jax.ShapeDtypeStruct((1,), jnp.int32),
               **{k: jax.ShapeDtypeStruct((1, 16), jnp.int32) for k in ("tokens", "input_mask", "mask_ar")})
  n = count(nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"]))
  assert abs(n - target) / target <= 0.05, n


# ---- optimisation ----------------------------------------------------------------------


@pytest.mark.parametrize("mode,steps", [("none", 1), ("vanilla", 3), ("connector", 3)])
def test_a_few_optimizer_steps_lower_the_loss(mode, steps):
  cfg = tiny(mode, steps)
  model, params = init(cfg)
  batch = make_batch(cfg)
  kind = "final_only" if mode == "vanilla" else "monotonic"
  tx = optax.adam(3e-3)

  def loss_fn(p):
    out = model.apply({"params": p}, batch)
    tok, _ = losses.per_step_token_losses(
        lambda h: model.apply({"params": p}, h, method=model.logits), out["hidden"], batch["tokens"])
    total, aux = losses.recursion_loss(tok, batch["mask_loss"][:, 1:], kind=kind)
    return total, aux["loss_per_step"]

  @jax.jit
  def step(p, s):
    (_, per_step), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, per_step, g

  opt = tx.init(params)
  first = None
  for _ in range(8):
    params, opt, per_step, grads = step(params, opt)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    first = per_step if first is None else first
  # The monotonic total re-weights tokens as steps diverge, so it is not a monotone
  # objective to watch; the cross-entropy at every depth is.
  _, last = jax.jit(loss_fn)(params)
  assert np.all(np.asarray(last) < 0.9 * np.asarray(first)), (first, last)
  if mode == "connector":  # gradients reach the zero-initialised projections
    assert float(jnp.abs(grads["recursion"]["step"]["connector"]["proj"]).max()) > 0


# ---- attention-plateau options (QK-norm, learned logit scale) ------------------------

ATTN_ON = {"qk_norm": True, "logit_scale": "learned", "logit_scale_init": 2.5}
_NEW_PARAM_NAMES = ("q_norm", "k_norm", "logit_scale")


def attn(parts=("decoder", "vit"), **options):
  """tiny() overrides setting attention `options` (default: all on) in `parts`."""
  options = options or ATTN_ON
  return {f"{part}.{k}": v for part in parts for k, v in options.items()}


def _paths(cfg):
  model = vlm.make_model(cfg)
  batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_batch(cfg))
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"]
  return boxed, optim.param_paths(boxed)


def random_params(cfg, seed=1):
  """Random params without running init: N(1, 0.3^2) for scales (incl. logit_scale),
  N(0, 0.3^2) elsewhere, from numpy (compiling `init` and jax's RNG per leaf costs tens
  of seconds on 2 cores; these tests only need live, non-degenerate values)."""
  rng = np.random.default_rng(seed)
  boxed, _ = _paths(cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(
          ("scale" in jax.tree_util.keystr(path)) + 0.3 * rng.standard_normal(x.shape), x.dtype),
      nn.unbox(boxed))


def _attns(params):
  """The decoder's and the ViT's attention param dicts."""
  return [params["recursion"]["step"]["stack"]["layers"]["layer"]["attn"],
          params["vit"]["blocks"]["attn"]]


def test_attention_options_off_add_no_params_and_change_nothing():
  """Off (the preset default) keeps the param tree of checkpoints made before the
  options existed: 73,120 params for tiny, measured before they were added. A learned
  scale initialised to 1 multiplies the logits by exactly 1.0: bit-identical outputs,
  so the scale sits on top of 1/sqrt(head_dim) rather than replacing it."""
  cfg = tiny("connector", 2)
  assert abstract_count(cfg) == 73_120
  _, paths = _paths(cfg)
  assert not [p for p in jax.tree.leaves(paths) if any(n in p for n in _NEW_PARAM_NAMES)]
  learned = tiny("connector", 2, **attn(logit_scale="learned"))
  params_l = random_params(learned)
  for a in _attns(params_l):
    a["logit_scale"] = jnp.ones_like(a["logit_scale"])
  params = jax.tree_util.tree_map(lambda x: x, params_l)  # the same values, less the scales
  for a in _attns(params):
    del a["logit_scale"]
  batch = make_batch(cfg)
  np.testing.assert_array_equal(forward(vlm.make_model(cfg), params, batch)["hidden"],
                                forward(vlm.make_model(learned), params_l, batch)["hidden"])


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(logit_scale="learned"), ATTN_ON],
                         ids=["qk_norm", "learned", "both"])
def test_attention_options_add_exactly_their_params(options):
  """Per attention layer: QK-norm adds 2 x head_dim (q and k scales), a learned logit
  scale adds num_heads; the decoder has decoder.depth layers, the ViT vit.depth."""
  cfg = tiny("connector", 2)
  dec, vit = cfg.decoder, cfg.vit
  per_layer = lambda head_dim, heads: (  # noqa: E731
      2 * head_dim * options.get("qk_norm", False)
      + heads * (options.get("logit_scale") == "learned"))
  want = {"decoder": dec.depth * per_layer(dec.head_dim, dec.num_heads),
          "vit": vit.depth * per_layer(vit.width // vit.num_heads, vit.num_heads)}
  base = abstract_count(cfg)
  for parts in (("decoder",), ("vit",), ("decoder", "vit")):
    got = abstract_count(tiny("connector", 2, **attn(parts, **options))) - base
    assert got == sum(want[p] for p in parts) > 0, (parts, got)


def test_attention_option_params_init_names_and_no_weight_decay():
  """logit_scale starts at logit_scale_init per layer and head, QK-norm scales at 1;
  every new param has a sharding rule for each of its logical axes and matches
  configs/base.py's no_decay regexes (a learned temperature or norm scale decayed
  towards 0 would flatten attention)."""
  from configs import base
  cfg = tiny("connector", 2, **attn())
  boxed, paths = _paths(cfg)
  _, params = init(cfg)
  no_decay = optim.regex_mask(params, base.get_config().optim.no_decay)
  rules = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
  shapes = [(cfg.decoder.depth, cfg.decoder.num_heads, cfg.decoder.head_dim),
            (cfg.vit.depth, cfg.vit.num_heads, cfg.vit.width // cfg.vit.num_heads)]
  for node, box, path, decay, (depth, heads, head_dim) in zip(
      _attns(params), _attns(boxed), _attns(paths), _attns(no_decay), shapes):
    np.testing.assert_array_equal(node["logit_scale"], np.full((depth, heads), 2.5, np.float32))
    assert box["logit_scale"].names == ("layers", "heads")
    assert path["logit_scale"].endswith("attn/logit_scale") and decay["logit_scale"]
    for norm in ("q_norm", "k_norm"):
      np.testing.assert_array_equal(node[norm]["scale"], np.ones((depth, head_dim), np.float32))
      assert box[norm]["scale"].names == ("layers", "head_dim")
      assert decay[norm]["scale"]
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)):
    assert set(leaf.names) <= rules, leaf.names


_HF_OPTIONS_ON = {"decoder.qkv_bias": True, "decoder.out_bias": True, "decoder.mlp_bias": True,
                  "vit.final_norm": False, "vit.norm_eps": 1e-5, "projector.act": "gelu",
                  "attention": "causal"}


@pytest.mark.parametrize("option", list(_HF_OPTIONS_ON) + ["all"])
def test_hf_options_add_exactly_their_params(option):
  """qkv_bias adds (heads + 2 kv_heads) x head_dim per decoder layer, out_bias width,
  mlp_bias 2 mlp_dim + width; final_norm=False removes ln_final (2 x vit width); the
  eps, the GELU and the attention mask add nothing (the defaults are covered by
  test_attention_options_off_add_no_params_and_change_nothing: 73,120 params)."""
  cfg = tiny("connector", 2)
  dec, vit = cfg.decoder, cfg.vit
  want = {"decoder.qkv_bias": dec.depth * (dec.num_heads + 2 * dec.num_kv_heads) * dec.head_dim,
          "decoder.out_bias": dec.depth * dec.width,
          "decoder.mlp_bias": dec.depth * (2 * dec.mlp_dim + dec.width),
          "vit.final_norm": -2 * vit.width}
  options = _HF_OPTIONS_ON if option == "all" else {option: _HF_OPTIONS_ON[option]}
  got = abstract_count(tiny("connector", 2, **options)) - abstract_count(cfg)
  assert got == sum(want.get(k, 0) for k in options), (option, got)


def test_hf_option_params_names_axes_init_and_no_weight_decay():
  """The new biases: the exact param names and logical axes rvlm/convert/ writes to, zero
  init, a sharding rule per axis, and no weight decay (configs/base.py's `.*bias$`)."""
  from configs import base
  cfg = tiny("connector", 2, **_HF_OPTIONS_ON)
  boxed, paths = _paths(cfg)
  _, params = init(cfg)
  no_decay = optim.regex_mask(params, base.get_config().optim.no_decay)
  rules = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
  dec = cfg.decoder
  want = {("attn", "q"): (("layers", "heads", "head_dim"), (dec.num_heads, dec.head_dim)),
          ("attn", "k"): (("layers", "kv_heads", "head_dim"), (dec.num_kv_heads, dec.head_dim)),
          ("attn", "v"): (("layers", "kv_heads", "head_dim"), (dec.num_kv_heads, dec.head_dim)),
          ("attn", "o"): (("layers", "embed"), (dec.width,)),
          ("mlp", "gate"): (("layers", "mlp"), (dec.mlp_dim,)),
          ("mlp", "up"): (("layers", "mlp"), (dec.mlp_dim,)),
          ("mlp", "down"): (("layers", "embed"), (dec.width,))}
  layer = lambda tree: tree["recursion"]["step"]["stack"]["layers"]["layer"]  # noqa: E731
  for (module, name), (names, shape) in want.items():
    box = layer(boxed)[module][name]["bias"]
    assert box.names == names and tuple(box.value.shape) == (dec.depth,) + shape
    assert set(names) <= rules
    assert layer(paths)[module][name]["bias"].endswith(f"{module}/{name}/bias")
    np.testing.assert_array_equal(layer(params)[module][name]["bias"], 0)
    assert layer(no_decay)[module][name]["bias"]
  assert "ln_final" not in params["vit"]


def test_attention_option_params_get_gradients():
  """Both attentions pass finite, non-zero gradients to the new params (checked on the
  modules alone: compiling the full model's backward pass costs ~20 s here)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
  mask = layers.prefix_lm_mask(jnp.ones((2, 5), jnp.int32), jnp.asarray([[0, 0, 1, 1, 1]] * 2))
  pos = layers.positions_from_mask(jnp.ones((2, 5), jnp.int32))
  for module, args in [
      (layers.Attention(4, 2, 8, 100.0, qk_norm=True, logit_scale="learned",
                        logit_scale_init=2.5), (x, mask, pos)),
      (layers.VitAttention(2, qk_norm=True, logit_scale="learned", logit_scale_init=2.5), (x,))]:
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"])
    params = jax.tree.map(lambda s: jnp.asarray(1 + 0.3 * rng.standard_normal(s.shape),
                                                jnp.float32), shapes)
    target = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
    loss = lambda p, m=module, a=args, y=target: jnp.sum((m.apply({"params": p}, *a) - y) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    for leaf in (grads["logit_scale"], grads["q_norm"]["scale"], grads["k_norm"]["scale"]):
      assert bool(jnp.all(jnp.isfinite(leaf))) and float(jnp.abs(leaf).min()) > 0


# ---- bad configuration ---------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("connector.num_layers", 9, "connector.num_layers"),
    ("recursion.num_steps", 0, "recursion.num_steps"),
    ("decoder.num_heads", 3, "decoder.width"),
    ("vit.patch_size", 5, "vit.image_size"),
    ("vit.depth", -1, "vit.depth"),
    ("recursion.mode", "looped", "recursion.mode"),
    ("recursion.impl", "while", "recursion.impl"),
    ("connector.fusion", "max", "connector.fusion"),
    ("remat_policy", "some", "remat_policy"),
])
def test_bad_config_raises_naming_the_field(field, value, match):
  cfg = tiny("connector", 2)
  node = cfg
  *path, leaf = field.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    vlm.make_model(cfg)


def test_vit_depth_zero_is_a_per_patch_encoder():
  from rvlm.models.vit import ViT
  vit = ViT(image_size=16, patch_size=8, width=8, depth=0, num_heads=2, mlp_dim=16)
  images = jax.random.uniform(jax.random.PRNGKey(0), (1, 16, 16, 3))
  params = vit.init(jax.random.PRNGKey(1), images)
  assert "blocks" not in params["params"]
  changed = images.at[:, :8, :8].set(0.0)        # the first patch only
  diff = jnp.abs(vit.apply(params, images) - vit.apply(params, changed)).max(-1)[0]
  assert diff[0] > 0 and jnp.all(diff[1:] == 0)    # no patch sees another
  cfg = tiny("connector", 2)
  cfg.vit.depth = 0
  model = vlm.make_model(cfg)                     # the whole VLM builds with it
  assert model is not None


@pytest.mark.parametrize("overrides,match", [
    ({"decoder.logit_scale": "fixed"}, r"config\.model\.decoder\.logit_scale='fixed'"),
    ({"vit.logit_scale": "learnt"}, r"config\.model\.vit\.logit_scale='learnt'"),
    ({"decoder.logit_scale": "learned", "decoder.logit_scale_init": 0.0},
     r"config\.model\.decoder\.logit_scale_init=0\.0"),
    ({"vit.logit_scale": "learned", "vit.logit_scale_init": -2.0},
     r"config\.model\.vit\.logit_scale_init=-2\.0"),
    ({"vit.logit_scale": "learned", "vit.logit_scale_init": float("nan")},
     r"config\.model\.vit\.logit_scale_init=nan"),
    ({"decoder.logit_scale_init": 2.5}, r"decoder\.logit_scale_init=2\.5.*only used with"),
])
def test_bad_attention_options_raise_naming_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    vlm.make_model(tiny("connector", 2, **overrides))


def test_qk_norm_must_be_a_bool():
  # ConfigDict refuses a non-bool on override; a config rebuilt from a dict (e.g. JSON
  # with "false" as a string) does not, and a truthy string would silently turn it on.
  cfg = tiny("connector", 2)
  cfg.vit = dict(cfg.vit.to_dict(), qk_norm="false")
  with pytest.raises(ValueError, match=r"config\.model\.vit\.qk_norm='false'"):
    vlm.make_model(cfg)


@pytest.mark.parametrize("overrides,match", [
    ({"vit.norm_eps": 0.0}, r"config\.model\.vit\.norm_eps=0\.0"),
    ({"vit.norm_eps": -1e-6}, r"config\.model\.vit\.norm_eps=-1e-06"),
    ({"vit.norm_eps": float("inf")}, r"config\.model\.vit\.norm_eps=inf"),
    ({"projector.act": "relu"}, r"config\.model\.projector\.act='relu'"),
    ({"attention": "bidirectional"}, r"config\.model\.attention='bidirectional'"),
])
def test_bad_hf_options_raise_naming_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    vlm.make_model(tiny("connector", 2, **overrides))


@pytest.mark.parametrize("part,field", [("decoder", "qkv_bias"), ("decoder", "out_bias"),
                                        ("decoder", "mlp_bias"), ("vit", "final_norm")])
def test_hf_flags_must_be_bools(part, field):
  # As for qk_norm: a config rebuilt from JSON could carry "false", which reads as on.
  cfg = tiny("connector", 2)
  cfg[part] = dict(cfg[part].to_dict(), **{field: "false"})
  with pytest.raises(ValueError, match=rf"config\.model\.{part}\.{field}='false': must be a bool"):
    vlm.make_model(cfg)
  cfg = tiny("connector", 2)
  cfg[part] = dict(cfg[part].to_dict(), **{field: 1})
  with pytest.raises(ValueError, match=rf"config\.model\.{part}\.{field}=1: must be a bool"):
    vlm.make_model(cfg)


def test_standard_mode_rejects_more_than_one_step():
  with pytest.raises(ValueError, match="recursion.num_steps"):
    vlm.make_model(tiny("none", 2))


def test_saved_configs_without_newer_options_get_their_defaults():
  """A checkpoint's config written before an option existed loads with its default."""
  from rvlm import inference  # pylint: disable=g-import-not-at-top
  saved = presets.tiny().to_dict()
  for section, field in (("decoder", "qkv_bias"), ("vit", "final_norm"), ("projector", "act")):
    del saved[section][field]
  del saved["attention"]
  config = inference._config_from({"model": saved}, "/nowhere")  # pylint: disable=protected-access
  assert config.model.to_dict() == presets.tiny().to_dict()
  vlm.check_model_config(config.model)
