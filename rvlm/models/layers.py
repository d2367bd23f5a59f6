"""Transformer building blocks with logical axis names on every kernel and activation.

Kernels carry logical names ('embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'vocab',
...) through `nn.with_logical_partitioning`; `rvlm.sharding` maps them to mesh axes.
Norms, softmax and RoPE run in float32 whatever the compute dtype.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Activations: names that `rvlm.sharding` rules map onto the mesh.
ACT_SEQ = ("act_batch", "act_len", "act_embed")


def constrain(x, names=ACT_SEQ):
  return nn.with_logical_constraint(x, names)


def dense_init(axes: Sequence[str], init=nn.initializers.lecun_normal()):
  return nn.with_logical_partitioning(init, tuple(axes))


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


def _masked_softmax_attention(q, k, v, mask, dtype):
  """q: [B, T, K, G, D], k/v: [B, S, K, D], mask: [B, 1, T, S] -> [B, T, K, G, D]."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  big_neg = jnp.finfo(jnp.float32).min
  logits = jnp.where(mask[:, :, None, :, :], logits, big_neg)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE (decoder)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, positions):
    d = x.shape[-1]
    proj = lambda n, h, axes: nn.DenseGeneral(  # noqa: E731
        (h, self.head_dim), use_bias=False, dtype=self.dtype,
        kernel_init=dense_init(axes), name=n)
    q = proj("q", self.num_heads, ("embed", "heads", "head_dim"))(x)
    k = proj("k", self.num_kv_heads, ("embed", "kv_heads", "head_dim"))(x)
    v = proj("v", self.num_kv_heads, ("embed", "kv_heads", "head_dim"))(x)
    q = rope(q, positions, self.rope_theta)
    k = rope(k, positions, self.rope_theta)
    b, t = x.shape[:2]
    groups = self.num_heads // self.num_kv_heads
    q = q.reshape(b, t, self.num_kv_heads, groups, self.head_dim)
    out = _masked_softmax_attention(q, k, v, mask, self.dtype)
    out = out.reshape(b, t, self.num_heads, self.head_dim)
    out = nn.with_logical_constraint(out, ("act_batch", "act_len", "act_heads", None))
    return nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                           kernel_init=dense_init(("heads", "head_dim", "embed")), name="o")(out)


class SwiGLU(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    dense = lambda n, f, axes: nn.Dense(f, use_bias=False, dtype=self.dtype,  # noqa: E731
                                        kernel_init=dense_init(axes), name=n)
    h = nn.silu(dense("gate", self.hidden, ("embed", "mlp"))(x)) * dense("up", self.hidden, ("embed", "mlp"))(x)
    h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
    return dense("down", d, ("mlp", "embed"))(h)


class VitAttention(nn.Module):
  """Bidirectional multi-head attention with biases (SigLIP / ViT)."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    hd = d // self.num_heads
    proj = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, hd), dtype=self.dtype, name=name,
        kernel_init=dense_init(("vit_embed", "heads", "head_dim")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")))
    q, k, v = proj("q")(x), proj("k")(x), proj("v")(x)
    mask = jnp.ones((b, 1, n, n), bool)
    out = _masked_softmax_attention(q[:, :, :, None, :], k, v, mask, self.dtype)[:, :, :, 0, :]
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="o",
                           kernel_init=dense_init(("heads", "head_dim", "vit_embed")),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vit_embed",)))(out)


class GeluMLP(nn.Module):
  hidden: int
  in_axis: str = "vit_embed"
  hidden_axis: str = "vit_mlp"
  out_axis: str = "vit_embed"
  out_features: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = self.out_features or x.shape[-1]
    bias = lambda axis: nn.with_logical_partitioning(nn.initializers.zeros, (axis,))  # noqa: E731
    h = nn.Dense(self.hidden, dtype=self.dtype, name="fc1",
                 kernel_init=dense_init((self.in_axis, self.hidden_axis)), bias_init=bias(self.hidden_axis))(x)
    h = nn.gelu(h, approximate=True)
    return nn.Dense(out, dtype=self.dtype, name="fc2",
                    kernel_init=dense_init((self.hidden_axis, self.out_axis)), bias_init=bias(self.out_axis))(h)


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
