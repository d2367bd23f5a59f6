"""The recursive VLM: image encoder + projector + token embeddings + recursion + head.

Sequence layout (PaliGemma convention): [image tokens][bos prompt][answer eos][pad].
The batch carries only the text part (`tokens`, `input_mask`, `mask_ar`, `mask_loss`)
plus `image` and `image_mask`; the image tokens are prepended here. Examples without an
image (image_mask = 0) get their image positions masked out of attention.

`__call__` returns the final-layer hidden states of every recursion step on the text
positions, [R, B, T, d]; `logits` applies the one shared final norm + LM head to any of
them, so a loss can read every depth without materialising R x B x T x V logits.
"""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from rvlm.models import layers
from rvlm.models.connector import ALPHA_SHAPES, BASES, FUSIONS, INITS, PROJECTIONS
from rvlm.models.recursion import IMPLS, MODES, Recursion
from rvlm.models.vit import ViT, Projector


# config.model.attention: 'prefix' (PaliGemma: image + prompt see each other, the answer
# is causal) or 'causal' (every position causal, image and prompt too: HF LLaVA and
# causal LMs). The param tree is the same; only the mask differs.
ATTENTIONS = ("prefix", "causal")


def _fail(field, value, why):
  raise ValueError(f"config.model.{field}={value!r}: {why}")


def _check_bool(field, value):
  if not isinstance(value, bool):  # a string 'False' would read as on
    _fail(field, value, "must be a bool")


def _check_attention_options(part, c):
  """The attention-plateau options of `config.model.<part>` (decoder or vit)."""
  _check_bool(f"{part}.qk_norm", c.qk_norm)
  if c.logit_scale not in layers.LOGIT_SCALES:
    _fail(f"{part}.logit_scale", c.logit_scale, f"unknown; choose one of {layers.LOGIT_SCALES}")
  init = c.logit_scale_init
  if isinstance(init, bool) or not isinstance(init, (int, float)) or not 0 < init < math.inf:
    _fail(f"{part}.logit_scale_init", init, "must be a finite number > 0 (a multiplier on "
          "the attention logits; <= 0 flattens or inverts attention)")
  if c.logit_scale == "none" and init != 1.0:
    _fail(f"{part}.logit_scale_init", init,
          f"only used with {part}.logit_scale='learned' (it is {c.logit_scale!r})")


def check_model_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid field of a `config.model`."""
  vit, dec, rec, con = cfg.vit, cfg.decoder, cfg.recursion, cfg.connector
  for field, value in [("vocab_size", cfg.vocab_size), ("decoder.depth", dec.depth),
                       ("decoder.width", dec.width), ("decoder.num_heads", dec.num_heads),
                       ("decoder.num_kv_heads", dec.num_kv_heads), ("decoder.head_dim", dec.head_dim),
                       ("decoder.mlp_dim", dec.mlp_dim), ("vit.width", vit.width),
                       ("vit.num_heads", vit.num_heads),
                       ("vit.patch_size", vit.patch_size), ("vit.image_size", vit.image_size)]:
    if int(value) < 1:
      _fail(field, value, "must be >= 1")
  if int(vit.depth) < 0:
    _fail("vit.depth", vit.depth, "must be >= 0 (0: a per-patch encoder, no ViT blocks)")
  if dec.width % dec.num_heads:
    _fail("decoder.width", dec.width, f"not divisible by decoder.num_heads={dec.num_heads}")
  if dec.num_heads % dec.num_kv_heads:
    _fail("decoder.num_heads", dec.num_heads, f"not divisible by decoder.num_kv_heads={dec.num_kv_heads}")
  if dec.head_dim % 2:
    _fail("decoder.head_dim", dec.head_dim, "RoPE needs an even head_dim")
  if vit.width % vit.num_heads:
    _fail("vit.width", vit.width, f"not divisible by vit.num_heads={vit.num_heads}")
  if vit.image_size % vit.patch_size:
    _fail("vit.image_size", vit.image_size, f"not divisible by vit.patch_size={vit.patch_size}")
  if rec.mode not in MODES:
    _fail("recursion.mode", rec.mode, f"unknown; choose one of {MODES}")
  if rec.impl not in IMPLS:
    _fail("recursion.impl", rec.impl, f"unknown; choose one of {IMPLS}")
  _check_bool("recursion.remat", rec.remat)
  if rec.num_steps < 1:
    _fail("recursion.num_steps", rec.num_steps, "R must be >= 1")
  if rec.mode == "none" and rec.num_steps != 1:
    _fail("recursion.num_steps", rec.num_steps, "mode 'none' (standard transformer) needs R = 1")
  if rec.mode == "connector":
    if not 1 <= con.num_layers <= dec.depth:
      _fail("connector.num_layers", con.num_layers, f"k must be in [1, decoder.depth={dec.depth}]")
    for field, value, choices in [("projection", con.projection, PROJECTIONS),
                                  ("fusion", con.fusion, FUSIONS), ("base", con.base, BASES),
                                  ("alpha_shape", con.alpha_shape, ALPHA_SHAPES),
                                  ("init", con.init, INITS)]:
      if value not in choices:
        _fail(f"connector.{field}", value, f"unknown; choose one of {choices}")
  for part in ("decoder", "vit"):
    _check_attention_options(part, cfg[part])
  if cfg.projector.kind not in ("linear", "mlp"):
    _fail("projector.kind", cfg.projector.kind, "unknown; choose 'linear' or 'mlp'")
  # The HF-import options (rvlm/models/presets.py).
  for field in ("qkv_bias", "out_bias", "mlp_bias"):
    _check_bool(f"decoder.{field}", dec[field])
  _check_bool("vit.final_norm", vit.final_norm)
  eps = vit.norm_eps
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
    _fail("vit.norm_eps", eps, "must be a finite number > 0")
  if cfg.projector.act not in layers.GELU_ACTS:
    _fail("projector.act", cfg.projector.act, f"unknown; choose one of {layers.GELU_ACTS}")
  if cfg.attention not in ATTENTIONS:
    _fail("attention", cfg.attention, f"unknown; choose one of {ATTENTIONS}")
  layers.remat_policy(cfg.remat_policy)
  for field in ("dtype", "param_dtype"):
    if cfg[field] not in ("float32", "bfloat16"):
      _fail(field, cfg[field], "choose 'float32' or 'bfloat16'")


def num_image_tokens(cfg) -> int:
  return (cfg.vit.image_size // cfg.vit.patch_size) ** 2


def step_kwargs(cfg):
  """{'stack_kwargs', 'connector_kwargs'} of the recursion step (RecursionStep) that
  `cfg` builds; rvlm/decode.py applies the same step to its cached chunks."""
  dec, con = cfg.decoder, cfg.connector
  dtype = jnp.dtype(cfg.dtype)
  stack_kwargs = dict(width=dec.width, depth=dec.depth, num_heads=dec.num_heads,
                      num_kv_heads=dec.num_kv_heads, head_dim=dec.head_dim,
                      mlp_dim=dec.mlp_dim, rope_theta=dec.rope_theta, norm_eps=dec.norm_eps,
                      scan=cfg.scan_layers, remat_policy=cfg.remat_policy, dtype=dtype,
                      qk_norm=dec.qk_norm, logit_scale=dec.logit_scale,
                      logit_scale_init=dec.logit_scale_init, qkv_bias=dec.qkv_bias,
                      out_bias=dec.out_bias, mlp_bias=dec.mlp_bias)
  connector_kwargs = dict(con, num_image_tokens=num_image_tokens(cfg), norm_eps=dec.norm_eps,
                          dtype=dtype)
  return dict(stack_kwargs=stack_kwargs, connector_kwargs=connector_kwargs)


class VLM(nn.Module):
  """Built from a `config.model` (see rvlm/models/presets.py); use `make_model`."""
  cfg: Any  # a FrozenConfigDict

  def setup(self):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    dec = cfg.decoder
    self.vit = ViT(**dict(cfg.vit), dtype=dtype)
    self.projector = Projector(cfg.projector.kind, dec.width, dtype, act=cfg.projector.act)
    self.embed = nn.Embed(cfg.vocab_size, dec.width, dtype=dtype, name="embed",
                          embedding_init=nn.with_logical_partitioning(
                              nn.initializers.normal(0.02), ("vocab", "embed")))
    self.recursion = Recursion(cfg.recursion.mode, cfg.recursion.num_steps, cfg.recursion.impl,
                               remat=cfg.recursion.remat, **step_kwargs(cfg))
    self.final_norm = layers.RMSNorm(dec.norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = layers.Dense((cfg.vocab_size,), ("embed", "vocab"), dtype=dtype)

  def embed_text(self, tokens):
    """Step-1 input of text tokens alone [B, T, d] (decoding extends the text)."""
    return self.embed(tokens)

  def embed_inputs(self, batch):
    """Step-1 input E_0 [B, N, d] and the full-sequence input_mask / mask_ar.

    mask_ar: 0 on the image tokens and the batch's mask_ar on the text ('prefix'), or 1
    everywhere (attention 'causal': the batch's mask_ar is ignored)."""
    tokens = batch["tokens"]
    b = tokens.shape[0]
    image_mask = batch.get("image_mask", jnp.ones((b,), jnp.int32)).astype(jnp.int32)
    img = self.projector(self.vit(batch["image"]))
    img = img * image_mask[:, None, None].astype(img.dtype)
    txt = self.embed(tokens)
    nv = img.shape[1]
    e0 = layers.constrain(jnp.concatenate([img.astype(txt.dtype), txt], axis=1))
    input_mask = jnp.concatenate(
        [jnp.broadcast_to(image_mask[:, None], (b, nv)), batch["input_mask"].astype(jnp.int32)], 1)
    if self.cfg.attention == "causal":
      mask_ar = jnp.ones(input_mask.shape, jnp.int32)
    else:
      mask_ar = jnp.concatenate([jnp.zeros((b, nv), jnp.int32),
                                 batch["mask_ar"].astype(jnp.int32)], 1)
    return e0, input_mask, mask_ar

  def __call__(self, batch, num_steps: int | None = None):
    """Returns {'hidden': [R, B, T, d] text positions, 'step_inputs': [R, B, N, d]}.

    `num_steps` overrides R (any depth, including beyond the trained R).
    """
    e0, input_mask, mask_ar = self.embed_inputs(batch)
    mask = layers.prefix_lm_mask(input_mask, mask_ar)
    positions = layers.positions_from_mask(input_mask)
    hidden, step_inputs = self.recursion(e0, mask, positions, num_steps)
    nv = e0.shape[1] - batch["tokens"].shape[1]
    if self.is_initializing():  # create the head's params too
      self.logits(hidden[-1, :, nv:])
    return {"hidden": hidden[:, :, nv:], "step_inputs": step_inputs}

  def logits(self, hidden):
    """The shared final RMSNorm + LM head: [..., d] -> [..., V] float32."""
    h = self.final_norm(hidden)
    if self.cfg.tie_embeddings:
      out = layers.matmul_last(h, self.embed.embedding.T.astype(h.dtype))
    else:
      out = self.lm_head(h)
    return nn.with_logical_constraint(out.astype(jnp.float32), ("act_batch", "act_len", "act_vocab"))


def make_model(model_config: ml_collections.ConfigDict) -> VLM:
  check_model_config(model_config)
  return VLM(ml_collections.FrozenConfigDict(model_config))
