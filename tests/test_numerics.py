"""Numerical parity of rvlm (float32) with the plain-numpy float64 reference.

Every parameter is re-randomised with a numpy RNG, including norm scales, biases, the
connector's zero-initialised projections, its fusion logits and alpha: with the default
init (zero projections, alpha = 1, unit scales) several code paths cancel or reduce to
the identity and a wrong layout would go unnoticed.

Tolerance: rvlm computes in float32 and the reference in float64, so the gap is float32
rounding accumulated over the depth (L layers x R steps). We bound the max abs error
relative to the output's scale, err / max(1, max|ref|) <= 1e-5, i.e. a few float32 ulps
(2^-23 ~ 1.2e-7) per op at most. Hidden states here reach ~10 and logits ~30 (unit
embeddings, d = 32), so the bound is ~1e-4 to ~3e-4 absolute; measured: <= 3.5e-6
relative (<= 2.3e-5 absolute) over all cases. A real bug (a wrong RoPE pairing, GQA
grouping, mask, sampled layer or connector weight index) changes outputs at O(0.1-1).
Matmuls run with `jax.default_matmul_precision('float32')` so a backend that would use
reduced precision for f32 dots (TF32 / bf16 passes) cannot blur the comparison.

The attention-plateau options (QK-norm, learned logit scale; decoder and ViT) are
checked the same way, with their params re-randomised too: learned logit scales
U(1.5, 3.5) (around a sharpening init of 2.5, distinct per layer and head), QK-norm
scales like every norm scale. Measured with the options on: <= 2.5e-6 relative
(<= 6.6e-5 absolute on logits up to ~27), within the same bound.

The options for importing Hugging Face checkpoints (decoder q/k/v, o and MLP biases,
the ViT's LayerNorm eps and no final LayerNorm, the exact-GELU projector, fully causal
attention) are checked all on together and each alone. The ViT eps is set to 0.25, far
from the default 1e-6, so that an eps that is not wired through (LayerNorms or the ViT
QK-norm) shows at O(0.1) rather than at the tolerance. Measured: <= 6.5e-7 relative.
"""
import copy
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_reference as ref  # noqa: E402

from rvlm.models import decoder as rdecoder  # noqa: E402
from rvlm.models import layers as rlayers  # noqa: E402
from rvlm.models import presets, vlm  # noqa: E402

REL_TOL = 1e-5


def rel_err(got, want):
  """Max abs error relative to the reference's scale (at least 1)."""
  got = np.asarray(got, np.float64)
  return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def init_shapes(module, *args):
  """The unboxed param tree as shapes only: `init` outside jit runs op by op and takes
  ~20 s on 2 CPU cores, and every value is replaced by `randomise` anyway."""
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))
  return nn.unbox(variables["params"])


def randomise(params, seed):
  """Fresh numpy-RNG values (float32) for every leaf of a param tree (arrays or
  shapes), chosen by what the leaf is.

  Kernels: N(0, 1/fan_in) so activations stay O(1) through depth and recursion.
  Norm scales and alpha: U(0.5, 1.5) (non-unit, positive, distinct per channel).
  Biases: N(0, 0.1^2). Embeddings: N(0, 1). Fusion logits: N(0, 1).
  Learned attention logit scales: U(1.5, 3.5) (sharpening, distinct per head).
  """
  rng = np.random.default_rng(seed)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]

  def new(path, x):
    names = [getattr(k, "key", str(k)) for k in path]
    name, parent = names[-1], names[-2] if len(names) > 1 else ""
    shape = tuple(x.shape)
    if name in ("scale", "norm_scale", "alpha"):
      v = rng.uniform(0.5, 1.5, shape)
    elif name == "logit_scale":
      v = rng.uniform(1.5, 3.5, shape)
    elif name == "bias":
      v = 0.1 * rng.standard_normal(shape)
    elif name in ("embedding", "pos_embedding", "fusion_logits"):
      v = rng.standard_normal(shape)
    elif parent == "o":   # [(L,) heads, head_dim, d]: fan-in = heads * head_dim
      v = rng.standard_normal(shape) / np.sqrt(shape[-3] * shape[-2])
    elif parent in ("q", "k", "v"):   # [(L,) d, heads, head_dim]
      v = rng.standard_normal(shape) / np.sqrt(shape[-3])
    else:                 # dense kernels [..., in, out] (incl. connector projections)
      v = rng.standard_normal(shape) / np.sqrt(shape[-2])
    return jnp.asarray(v, jnp.float32)

  leaves = [new(p, x) for p, x in flat]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


# ----------------------------------------------------------------------------------------
# Decoder stack alone (arbitrary masks, GQA with 3 query heads per kv head).
# ----------------------------------------------------------------------------------------

def test_masks_and_positions_match_definition():
  """rvlm's prefix-LM mask and RoPE positions equal the reference's definitions,
  including a pad in the middle and a causal run after a prefix."""
  input_mask = np.array([[1, 1, 1, 1, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
  mask_ar = np.array([[0, 0, 1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 1, 0, 1, 1]])
  got_mask = np.asarray(rlayers.prefix_lm_mask(jnp.asarray(input_mask), jnp.asarray(mask_ar)))
  got_pos = np.asarray(rlayers.positions_from_mask(jnp.asarray(input_mask)))
  for b in range(2):
    np.testing.assert_array_equal(got_mask[b, 0], ref.prefix_lm_mask(input_mask[b], mask_ar[b]))
    np.testing.assert_array_equal(got_pos[b], ref.rope_positions(input_mask[b]))


BIASES_ON = dict(qkv_bias=True, out_bias=True, mlp_bias=True)


@pytest.mark.parametrize("qk_norm,logit_scale,biases", [
    (False, "none", {}), (True, "learned", {}), (False, "none", BIASES_ON),
    (True, "learned", BIASES_ON)], ids=["plain", "attn", "biases", "attn_biases"])
def test_decoder_stack_matches_reference(qk_norm, logit_scale, biases):
  """DecoderStack vs the numpy decoder: GQA (6 heads, 2 kv heads, head_dim 10 != d/H),
  RoPE, a prefix + causal part, padding; also the k sampled layer outputs. With the
  attention options on, 3 query heads per kv head check the per-query-head scale index;
  eps 1e-5 != 1e-6 checks that QK-norm uses the decoder's norm_eps. With the biases on,
  the kv-head biases check the GQA index of k / v biases, and with QK-norm too the
  order bias -> QK-norm -> RoPE."""
  width, depth, heads, kv, hd, mlp, k = 48, 3, 6, 2, 10, 80, 2
  theta, eps = 500.0, 1e-5
  stack = rdecoder.DecoderStack(width=width, depth=depth, num_heads=heads, num_kv_heads=kv,
                                head_dim=hd, mlp_dim=mlp, rope_theta=theta, norm_eps=eps,
                                num_sampled=k, qk_norm=qk_norm, logit_scale=logit_scale,
                                logit_scale_init=2.5, **biases)
  rng = np.random.default_rng(1)
  bsz, n = 2, 11
  x = rng.standard_normal((bsz, n, width))
  # Example 0: 4-token prefix, causal tail, 2 trailing pads. Example 1: a pad inside the
  # prefix (positions must not advance over it) and a causal tail.
  input_mask = np.array([[1] * 9 + [0] * 2, [1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
  mask_ar = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
  masks = np.stack([ref.prefix_lm_mask(input_mask[b], mask_ar[b]) for b in range(bsz)])
  pos = np.stack([ref.rope_positions(input_mask[b]) for b in range(bsz)]).astype(np.int32)
  args = (jnp.asarray(x, jnp.float32), jnp.asarray(masks[:, None]), jnp.asarray(pos))
  params = randomise(init_shapes(stack, *args), seed=2)
  with jax.default_matmul_precision("float32"):
    out, sampled = jax.jit(stack.apply)({"params": params}, *args)
  p = ref.to_numpy(params)["layers"]["layer"]
  has_bias = {(m, n): "bias" in p[m][n] for m, n in [("attn", "q"), ("attn", "k"), ("attn", "v"),
                                                     ("attn", "o"), ("mlp", "gate"),
                                                     ("mlp", "up"), ("mlp", "down")]}
  assert set(has_bias.values()) == {bool(biases)}, has_bias
  chosen = ref.sampled_layers(depth, k)
  assert chosen == [2, 3]
  for b in range(bsz):
    outs = ref.decoder_stack(x[b], masks[b], pos[b].astype(np.float64), p, theta, eps,
                             qk_norm, logit_scale, **biases)
    real = input_mask[b].astype(bool)
    assert rel_err(np.asarray(out)[b, real], outs[-1][real]) <= REL_TOL
    for s, layer in enumerate(chosen):
      assert rel_err(np.asarray(sampled)[s, b, real], outs[layer - 1][real]) <= REL_TOL


# ----------------------------------------------------------------------------------------
# Full VLM: ViT + projector + embeddings + recursion + shared head.
# ----------------------------------------------------------------------------------------

def _batch(cfg, seed):
  """3 examples: with image and padding, image-less with padding, image without padding."""
  rng = np.random.default_rng(seed)
  bsz, t = 3, 9
  size = cfg.vit.image_size
  input_mask = np.array([[1] * 7 + [0] * 2, [1] * 5 + [0] * 4, [1] * 9])
  # Prefix (mask_ar 0) then causal answer (1); pads carry mask_ar 1, as in PaliGemma.
  mask_ar = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1],
                      [0, 0, 0, 0, 0, 1, 1, 1, 1]])
  return dict(
      image=rng.uniform(-1, 1, (bsz, size, size, 3)).astype(np.float32),
      image_mask=np.array([1, 0, 1], np.int32),
      tokens=(rng.integers(1, cfg.vocab_size, (bsz, t)) * input_mask).astype(np.int32),
      input_mask=input_mask.astype(np.int32),
      mask_ar=mask_ar.astype(np.int32),
      mask_loss=(mask_ar * input_mask).astype(np.int32))


# The attention-plateau options, all on (a sharpening init; the values are re-randomised).
ATTN_ON = dict(qk_norm=True, logit_scale="learned", logit_scale_init=2.5)

# The HF-import options, all on (eps far from its 1e-6 default, so that it shows).
HF_DECODER = dict(qkv_bias=True, out_bias=True, mlp_bias=True)
HF_VIT = dict(norm_eps=0.25, final_norm=False)
HF_VIT_QK = dict(HF_VIT, qk_norm=True)

# (name, overrides of config.model) — each changes one or more code paths.
VLM_CASES = [
    ("none", dict(mode="none", num_steps=1)),
    ("vanilla", dict(mode="vanilla", num_steps=3)),
    ("conn_linear_mean_modal", dict(mode="connector", num_steps=3)),
    ("conn_mlp_softmax_shared", dict(mode="connector", num_steps=3, projection="mlp",
                                     fusion="softmax", modality_specific=False)),
    ("conn_linear_softmax_modal_prev_scalar_k3",
     dict(mode="connector", num_steps=3, fusion="softmax", base="prev",
          alpha_shape="scalar", num_layers=3, projector="linear")),
    ("conn_mlp_mean_modal_none_loop_untied",
     dict(mode="connector", num_steps=3, projection="mlp", base="none", num_layers=2,
          impl="loop", scan_layers=False, tie_embeddings=False)),
    # QK-norm + learned logit scale in the decoder and the ViT, in every recursion mode.
    ("none_attn", dict(mode="none", num_steps=1, decoder=ATTN_ON, vit=ATTN_ON)),
    ("vanilla_attn_loop", dict(mode="vanilla", num_steps=3, impl="loop", decoder=ATTN_ON,
                               vit=ATTN_ON)),
    ("conn_attn", dict(mode="connector", num_steps=3, decoder=ATTN_ON, vit=ATTN_ON)),
    # Each option alone, and different ones in the two towers (no cross-wiring).
    ("conn_attn_mixed", dict(mode="connector", num_steps=2, decoder=dict(qk_norm=True),
                             vit=dict(logit_scale="learned", logit_scale_init=0.5))),
    # The HF-import options: all on (with the ViT QK-norm, which reads vit.norm_eps) ...
    ("conn_hf_all", dict(mode="connector", num_steps=2, decoder=HF_DECODER, vit=HF_VIT_QK,
                         projector_act="gelu", attention="causal")),
    ("none_hf_all_loop", dict(mode="none", num_steps=1, decoder=HF_DECODER, vit=HF_VIT,
                              projector_act="gelu", attention="causal", impl="loop",
                              scan_layers=False)),
    # ... and each alone.
    ("conn_qkv_bias", dict(mode="connector", num_steps=2, decoder=dict(qkv_bias=True))),
    ("conn_out_mlp_bias", dict(mode="connector", num_steps=2,
                               decoder=dict(out_bias=True, mlp_bias=True))),
    ("conn_vit_eps", dict(mode="connector", num_steps=2, vit=dict(norm_eps=0.25))),
    ("conn_no_final_norm", dict(mode="connector", num_steps=2, vit=dict(final_norm=False))),
    ("conn_gelu_exact", dict(mode="connector", num_steps=2, projector_act="gelu")),
    ("vanilla_causal", dict(mode="vanilla", num_steps=2, attention="causal")),
]


def _config(over):
  cfg = presets.tiny()
  for key in ("mode", "num_steps", "impl"):
    if key in over:
      cfg.recursion[key] = over[key]
  for key in ("projection", "fusion", "modality_specific", "base", "alpha_shape", "num_layers"):
    if key in over:
      cfg.connector[key] = over[key]
  if "projector" in over:
    cfg.projector.kind = over["projector"]
  if "projector_act" in over:
    cfg.projector.act = over["projector_act"]
  if "attention" in over:
    cfg.attention = over["attention"]
  for key in ("scan_layers", "tie_embeddings"):
    if key in over:
      cfg[key] = over[key]
  for part in ("decoder", "vit"):  # attention and HF-import options
    cfg[part].update(over.get(part, {}))
  return cfg


@pytest.mark.parametrize("name,over", VLM_CASES, ids=[c[0] for c in VLM_CASES])
def test_vlm_logits_match_reference(name, over):
  """Every step's logits (and hidden states, step inputs) on the real positions."""
  cfg = _config(over)
  model = vlm.make_model(cfg)
  batch = _batch(cfg, seed=3)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = randomise(init_shapes(model, jbatch), seed=4)

  @jax.jit
  def fwd(params, batch):
    out = model.apply({"params": params}, batch)
    return out, model.apply({"params": params}, out["hidden"], method=model.logits)

  with jax.default_matmul_precision("float32"):
    out, logits = fwd(params, jbatch)
  want = ref.vlm_forward(ref.to_numpy(params), batch, cfg)
  steps = cfg.recursion.num_steps
  assert logits.shape == want["logits"].shape == (steps, 3, 9, cfg.vocab_size)
  text_real = batch["input_mask"].astype(bool)          # [B, T]
  all_real = want["input_mask"].astype(bool)            # [B, N], image-less rows masked
  errs = {}
  for r in range(steps):
    errs[f"logits{r}"] = rel_err(np.asarray(logits)[r][text_real], want["logits"][r][text_real])
    errs[f"hidden{r}"] = rel_err(np.asarray(out["hidden"])[r][text_real],
                                 want["hidden"][r][text_real])
    errs[f"input{r}"] = rel_err(np.asarray(out["step_inputs"])[r][all_real],
                                want["step_inputs"][r][all_real])
  print(name, {k: f"{v:.2e}" for k, v in errs.items()})
  assert max(errs.values()) <= REL_TOL, errs
  # The re-randomised connector must actually change later steps (nothing cancels).
  if steps > 1:
    assert np.max(np.abs(want["logits"][-1] - want["logits"][0])[text_real]) > 0.1


def test_image_less_example_ignores_image():
  """An image-less example's text outputs do not depend on its (masked) image pixels
  (bit-exact), in connector mode, where the image positions are rewritten by the
  connector every step and could leak if the mask did not hold across steps. (Parity
  of image-less examples with the reference is covered by every VLM case: example 1.)"""
  cfg = _config(dict(mode="connector", num_steps=2))
  model = vlm.make_model(cfg)
  batch = _batch(cfg, seed=5)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = randomise(init_shapes(model, jbatch), seed=6)
  fwd = jax.jit(lambda p, b: model.apply({"params": p}, b)["hidden"])
  other = dict(jbatch, image=jbatch["image"].at[1].set(-jbatch["image"][1] * 0.5))
  with jax.default_matmul_precision("float32"):
    h1, h2 = fwd(params, jbatch), fwd(params, other)
  real = batch["input_mask"][1].astype(bool)
  np.testing.assert_array_equal(np.asarray(h1)[:, 1, real], np.asarray(h2)[:, 1, real])
  # Image-bearing examples do see their image change (the check above is not vacuous).
  other0 = dict(jbatch, image=jbatch["image"].at[0].set(-jbatch["image"][0]))
  with jax.default_matmul_precision("float32"):
    h3 = fwd(params, other0)
  assert np.max(np.abs(np.asarray(h3)[:, 0] - np.asarray(h1)[:, 0])) > 1e-3


def test_attention_options_change_the_reference():
  """Each attention option, in each tower, changes the reference logits at O(0.1) or
  more: the parity cases with the options on cannot pass by ignoring one of them."""
  cfg = _config(dict(mode="connector", num_steps=2, decoder=ATTN_ON, vit=ATTN_ON))
  model = vlm.make_model(cfg)
  batch = _batch(cfg, seed=7)
  params = ref.to_numpy(randomise(init_shapes(model, {k: jnp.asarray(v) for k, v in batch.items()}),
                                  seed=8))
  real = batch["input_mask"].astype(bool)
  want = ref.vlm_forward(params, batch, cfg)["logits"][:, real]
  for part in ("decoder", "vit"):
    for field, off in (("qk_norm", False), ("logit_scale", "none")):
      other = copy.deepcopy(cfg)
      other[part][field] = off
      got = ref.vlm_forward(params, batch, other)["logits"][:, real]
      assert np.max(np.abs(got - want)) > 0.1, (part, field)


def test_hf_options_change_the_reference():
  """Each HF-import option changes the reference logits at O(0.1) or more, so the parity
  cases cannot pass by ignoring one (the biases, which the re-randomisation draws at
  N(0, 0.1^2), are scaled up here to N(0, 1) to make their effect plain). The exact and
  the tanh GELU differ by at most ~5e-4, too little to show here: the projector has its
  own test (test_projector_gelu_matches_reference)."""
  cfg = _config(dict(mode="connector", num_steps=2, decoder=HF_DECODER, vit=HF_VIT_QK,
                     projector_act="gelu", attention="causal"))
  model = vlm.make_model(cfg)
  batch = _batch(cfg, seed=9)
  params = ref.to_numpy(randomise(init_shapes(model, {k: jnp.asarray(v) for k, v in batch.items()}),
                                  seed=10))
  layer = params["recursion"]["step"]["stack"]["layers"]["layer"]
  for module, names in (("attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
    for name in names:
      layer[module][name]["bias"] = layer[module][name]["bias"] * 10.0
  real = batch["input_mask"].astype(bool)
  want = ref.vlm_forward(params, batch, cfg)["logits"][:, real]
  for part, field, off in [("decoder", "qkv_bias", False), ("decoder", "out_bias", False),
                           ("decoder", "mlp_bias", False), ("vit", "norm_eps", 1e-6),
                           (None, "attention", "prefix")]:
    other = copy.deepcopy(cfg)
    (other[part] if part else other)[field] = off
    got = ref.vlm_forward(params, batch, other)["logits"][:, real]
    assert np.max(np.abs(got - want)) > 0.1, (part, field)
  # final_norm: the reference with a final LayerNorm of unit scale and zero bias.
  other = copy.deepcopy(cfg)
  other.vit.final_norm = True
  width = cfg.vit.width
  with_ln = dict(params, vit=dict(params["vit"], ln_final=dict(scale=np.ones(width),
                                                               bias=np.zeros(width))))
  got = ref.vlm_forward(with_ln, batch, other)["logits"][:, real]
  assert np.max(np.abs(got - want)) > 0.1


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu"])
def test_projector_gelu_matches_reference(act):
  """The 'mlp' projector with each GELU against the reference, at a tolerance (1e-6
  relative) well under the gap between the two GELUs on these inputs (pre-activations
  N(0, 2^2), where tanh-approximate and exact GELU differ by up to ~5e-4): a projector
  that ignored `act` fails one of the two cases."""
  from rvlm.models.vit import Projector
  proj = Projector("mlp", 24, act=act)
  rng = np.random.default_rng(11)
  x = rng.standard_normal((2, 5, 16))
  params = randomise(init_shapes(proj, jnp.asarray(x, jnp.float32)), seed=12)
  params["mlp"]["fc1"]["kernel"] = params["mlp"]["fc1"]["kernel"] * 2.0
  with jax.default_matmul_precision("float32"):
    got = np.asarray(jax.jit(proj.apply)({"params": params}, jnp.asarray(x, jnp.float32)))
  p = ref.to_numpy(params)
  for b in range(2):
    assert rel_err(got[b], ref.projector(x[b], p, "mlp", act)) <= 1e-6
  other = ref.projector(x[0], p, "mlp", {"gelu": "gelu_tanh", "gelu_tanh": "gelu"}[act])
  assert rel_err(got[0], other) > 1e-5
