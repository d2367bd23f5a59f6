"""Transformer building blocks with logical axis names on every kernel and activation.

Kernels carry logical names ('embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'vocab',
...) through `nn.with_logical_partitioning`; `rvlm.sharding` maps them to mesh axes.
Norms, softmax and RoPE run in float32 whatever the compute dtype.

Both attentions take the two "attention-plateau" options (off by default, and then the
computation and the param tree are exactly those without them):
  qk_norm      RMSNorm over head_dim of every query and key head (one learnable
               [head_dim] scale each for q and k, shared by the heads, as in Gemma-3 /
               Qwen3; OLMo-2 and ViT-22B normalise q and k likewise), before RoPE in the
               decoder. It bounds the logits' growth, which otherwise saturates the
               softmax and stalls training.
  logit_scale  'learned': a learnable per-query-head multiplier on the logits on top of
               1/sqrt(head_dim), initialised to `logit_scale_init`; an init > 1 starts
               attention sharper (the Eureka-moments fix for the plateau in which
               near-uniform attention cannot pick out the tokens a task needs).
               'none': plain 1/sqrt(head_dim).

Options for importing Hugging Face checkpoints (off by default; off adds no params):
  Attention qkv_bias / out_bias (Qwen2: q/k/v biases; Llama attention_bias: all four),
  SwiGLU use_bias (Llama mlp_bias), GeluMLP act 'gelu' (exact erf GELU, as LLaVA's
  projector) against the default tanh approximation.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Activations: names that `rvlm.sharding` rules map onto the mesh.
ACT_SEQ = ("act_batch", "act_len", "act_embed")


def constrain(x, names=ACT_SEQ):
  return nn.with_logical_constraint(x, names)


def matmul_last(x, kernel, num_in: int = 1):
  """Contracts the last `num_in` dims of x with the leading `num_in` dims of kernel.

  Done as one 2-D matmul: XLA:CPU runs rank-3 dots whose operands are fused with
  elementwise ops (e.g. SiLU in the backward pass) as slow loop nests, measured 2x
  slower for a SwiGLU step; flattened they go to the GEMM library on every backend.
  """
  in_shape, out_shape = kernel.shape[:num_in], kernel.shape[num_in:]
  lead = x.shape[:x.ndim - num_in]
  y = x.reshape(-1, math.prod(in_shape)) @ kernel.reshape(math.prod(in_shape), -1)
  return y.reshape(lead + out_shape)


class Dense(nn.Module):
  """y = x . kernel (+ bias), contracting x's last `len(in_shape)` dims.

  The kernel keeps its real multi-axis shape (in_shape + out_shape) and logical
  names from initialisation on (flax's DenseGeneral initialises a flat kernel and
  reshapes it, which breaks logical partitioning under a mesh).
  """
  out_shape: tuple
  kernel_axes: tuple
  num_in: int = 1
  bias_axes: tuple | None = None   # None: no bias
  kernel_init: Any = None          # default: lecun_normal over the fan-in dims
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_shape = tuple(self.out_shape)
    shape = tuple(x.shape[x.ndim - self.num_in:]) + out_shape
    in_axes = tuple(range(self.num_in))
    out_axes = tuple(range(self.num_in, len(shape)))
    init = self.kernel_init or nn.initializers.lecun_normal(in_axis=in_axes, out_axis=out_axes)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.kernel_axes)),
                        shape, jnp.float32)
    y = matmul_last(x.astype(self.dtype), kernel.astype(self.dtype), self.num_in)
    if self.bias_axes is not None:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                             tuple(self.bias_axes)),
                        out_shape, jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  eps: float = 1e-6
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


def rope(x, positions, theta: float):
  """Rotary embedding, rotate-half convention (Llama / Qwen2 / HF).

  x: [B, T, H, D]; positions: [B, T] integer positions.
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def prefix_lm_mask(input_mask, mask_ar):
  """Attention mask [B, 1, N, N] for the prefix-LM layout (big_vision convention).

  Token i attends to token j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i] and both are
  real tokens: mask_ar = 0 tokens form a fully-visible prefix, mask_ar = 1 tokens are
  causal.
  """
  cum = jnp.cumsum(mask_ar, axis=-1)
  visible = cum[:, None, :] <= cum[:, :, None]
  valid = input_mask[:, None, :].astype(bool) & input_mask[:, :, None].astype(bool)
  return (visible & valid)[:, None, :, :]


def positions_from_mask(input_mask):
  """RoPE positions: index among the real tokens (padding does not advance)."""
  return jnp.maximum(jnp.cumsum(input_mask, axis=-1) - 1, 0)


LOGIT_SCALES = ("none", "learned")
GELU_ACTS = ("gelu_tanh", "gelu")   # tanh-approximate (GPT-2 / SigLIP) | exact erf GELU


# The decoding cache's layouts (Attention with `kv_cache`): keys [B * K, D, S] and values
# [B * K, S, D], rows (batch row, KV head) row-major; the slot axis of each.
KV_CACHE_SLOT_AXES = (2, 1)


def kv_cache_shapes(batch, num_kv_heads, head_dim, slots):
  """(keys' shape, values' shape) of one layer's decoding cache."""
  rows = batch * num_kv_heads
  return (rows, head_dim, slots), (rows, slots, head_dim)


def _masked_softmax_attention(q, k, v, mask, dtype, logit_scale=None, cache_layout=False):
  """q: [B, T, K, G, D], k/v: [B, S, K, D], mask: [B, 1, T, S] -> [B, T, K, G, D].
  With `cache_layout`, k and v are in the decoding cache's layouts (kv_cache_shapes).

  The G query heads that share a KV head are folded into the query length, so both
  products are plain batched matmuls over (B, K) and K/V are never repeated.
  `logit_scale` ([K * G] per query head, head h = kv * G + g, or None) multiplies the
  float32 logits, before masking so masked entries stay at the float32 minimum.
  """
  b, t, kh, g, d = q.shape
  qf = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, d) * jnp.asarray(d ** -0.5, q.dtype)
  if cache_layout:
    logits = jnp.einsum("nqd,nds->nqs", qf.reshape(b * kh, g * t, d), k,
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("bkqd,bskd->bkqs", qf, k, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, kh, g, t, -1)
  if logit_scale is not None:
    logits = logits * logit_scale.astype(jnp.float32).reshape(1, kh, g, 1, 1)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype).reshape(b, kh, g * t, -1)
  if cache_layout:
    out = jnp.einsum("nqs,nsd->nqd", probs.reshape(b * kh, g * t, -1), v)
  else:
    out = jnp.einsum("bkqs,bskd->bkqd", probs, v)
  return out.reshape(b, kh, g, t, d).transpose(0, 3, 1, 2, 4)


def _norm_qk(module, q, k, eps):
  """Per-head RMSNorm of q and k over head_dim: submodules `q_norm`, `k_norm` of
  `module`, each with one [head_dim] scale shared by the heads (Gemma-3 / Qwen3)."""
  q = RMSNorm(eps, axis_name="head_dim", parent=module, name="q_norm")(q)
  k = RMSNorm(eps, axis_name="head_dim", parent=module, name="k_norm")(k)
  return q, k


def _logit_scale(module, kind, init, num_heads):
  """The [num_heads] learned logit multiplier, or None for plain 1/sqrt(head_dim)."""
  if kind == "none":
    return None
  if kind != "learned":
    raise ValueError(f"logit_scale={kind!r} is unknown; choose one of {LOGIT_SCALES}")
  return module.param("logit_scale", nn.with_logical_partitioning(
      nn.initializers.constant(init), ("heads",)), (num_heads,), jnp.float32)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE (decoder); optional QK-norm / logit scale."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  dtype: Dtype = jnp.float32
  qk_norm: bool = False
  logit_scale: str = "none"
  logit_scale_init: float = 1.0
  norm_eps: float = 1e-6
  qkv_bias: bool = False          # biases on q / k / v (Qwen2)
  out_bias: bool = False          # bias on the output projection o

  @nn.compact
  def __call__(self, x, mask, positions, kv_cache=None, cache_index=None):
    """x: [B, T, d]; mask: [B, 1, T, S]; positions: [B, T].

    Without a cache, S = T (self-attention over x) and the output is returned. With
    `kv_cache` = (k [B * K, D, S], v [B * K, S, D]), the keys and values of x are written
    at slots cache_index .. cache_index + T - 1 and x attends over all S slots (the
    mask says which hold real, visible tokens); returns (output, updated cache). These
    are the layouts the attention's two matmuls (batched over B and K) read in place:
    a [B, S, K, D] cache is transposed (copied whole) for them on every token.
    """
    d = x.shape[-1]
    proj = lambda n, h, axes: Dense(  # noqa: E731
        (h, self.head_dim), ("embed",) + axes, bias_axes=axes if self.qkv_bias else None,
        dtype=self.dtype, name=n)
    q = proj("q", self.num_heads, ("heads", "head_dim"))(x)
    k = proj("k", self.num_kv_heads, ("kv_heads", "head_dim"))(x)
    v = proj("v", self.num_kv_heads, ("kv_heads", "head_dim"))(x)
    if self.qk_norm:  # before RoPE: the rotation keeps the norm, the scale is per dim
      q, k = _norm_qk(self, q, k, self.norm_eps)
    q = rope(q, positions, self.rope_theta)
    k = rope(k, positions, self.rope_theta)
    b, t = x.shape[:2]
    if kv_cache is not None:
      (k_shape, v_shape), (k_axis, v_axis) = (
          kv_cache_shapes(b, self.num_kv_heads, self.head_dim, t), KV_CACHE_SLOT_AXES)
      k = jax.lax.dynamic_update_slice_in_dim(
          kv_cache[0], k.transpose(0, 2, 3, 1).reshape(k_shape).astype(kv_cache[0].dtype),
          cache_index, axis=k_axis)
      v = jax.lax.dynamic_update_slice_in_dim(
          kv_cache[1], v.transpose(0, 2, 1, 3).reshape(v_shape).astype(kv_cache[1].dtype),
          cache_index, axis=v_axis)
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
    scale = _logit_scale(self, self.logit_scale, self.logit_scale_init, self.num_heads)
    out = _masked_softmax_attention(q, k, v, mask, self.dtype, scale,
                                    cache_layout=kv_cache is not None)
    out = out.reshape(b, t, self.num_heads, self.head_dim)
    out = nn.with_logical_constraint(out, ("act_batch", "act_len", "act_heads", None))
    out = Dense((d,), ("heads", "head_dim", "embed"), num_in=2,
                bias_axes=("embed",) if self.out_bias else None, dtype=self.dtype, name="o")(out)
    return out if kv_cache is None else (out, (k, v))


class SwiGLU(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  use_bias: bool = False          # biases on gate / up / down (Llama mlp_bias)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = lambda n, f, axes: Dense(  # noqa: E731
        (f,), axes, bias_axes=axes[1:] if self.use_bias else None, dtype=self.dtype, name=n)
    h = nn.silu(dense("gate", self.hidden, ("embed", "mlp"))(x)) * dense("up", self.hidden, ("embed", "mlp"))(x)
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
    return dense("down", d, ("mlp", "embed"))(h)


class VitAttention(nn.Module):
  """Bidirectional multi-head attention with biases (SigLIP / ViT); optional QK-norm
  (after the biased projections, as in ViT-22B) and learned logit scale."""
  num_heads: int
  dtype: Dtype = jnp.float32
  qk_norm: bool = False
  logit_scale: str = "none"
  logit_scale_init: float = 1.0
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    proj = lambda name: Dense(  # noqa: E731
        (self.num_heads, hd), ("vit_embed", "heads", "head_dim"),
        bias_axes=("heads", "head_dim"), dtype=self.dtype, name=name)
    q, k, v = proj("q")(x), proj("k")(x), proj("v")(x)
    if self.qk_norm:
      q, k = _norm_qk(self, q, k, self.norm_eps)
    scale = _logit_scale(self, self.logit_scale, self.logit_scale_init, self.num_heads)
    mask = jnp.ones((b, 1, n, n), bool)
    out = _masked_softmax_attention(q[:, :, :, None, :], k, v, mask, self.dtype,
                                    scale)[:, :, :, 0, :]
    return Dense((d,), ("heads", "head_dim", "vit_embed"), num_in=2,
                 bias_axes=("vit_embed",), dtype=self.dtype, name="o")(out)


class GeluMLP(nn.Module):
  hidden: int
  in_axis: str = "vit_embed"
  hidden_axis: str = "vit_mlp"
  out_axis: str = "vit_embed"
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  act: str = "gelu_tanh"          # one of GELU_ACTS

  @nn.compact
  def __call__(self, x):
    if self.act not in GELU_ACTS:
      raise ValueError(f"GeluMLP act={self.act!r} is unknown; choose one of {GELU_ACTS}")
    out = self.out_features or x.shape[-1]
    h = Dense((self.hidden,), (self.in_axis, self.hidden_axis), bias_axes=(self.hidden_axis,),
              dtype=self.dtype, name="fc1")(x)
    h = nn.gelu(h, approximate=self.act == "gelu_tanh")
    return Dense((out,), (self.hidden_axis, self.out_axis), bias_axes=(self.out_axis,),
                 dtype=self.dtype, name="fc2")(h)


def remat_policy(name: str):
  """Maps config.model.remat_policy to a jax.checkpoint policy (None = no remat)."""
  policies = {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  if name not in policies:
    raise ValueError(f"config.model.remat_policy={name!r} is unknown; choose one of {sorted(policies)}")
  return policies[name]
