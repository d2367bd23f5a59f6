"""Decoder: one pre-norm layer and the stack of L distinct layers under `nn.scan`.

The stack returns its final output and the outputs of the k layers the Recursive
Connector samples (not all L): a [k, B, N, d] buffer is carried through the scan and
each sampled layer writes its slot. The buffer update is linear, so the backward pass
saves nothing extra for it.
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rvlm.models import layers


def sampled_layers(num_layers: int, k: int) -> tuple[int, ...]:
  """1-indexed layers ceil(i * L / k), i = 1..k (k = 4: L/4, L/2, 3L/4, L)."""
  return tuple(math.ceil(i * num_layers / k) for i in range(1, k + 1))


class DecoderLayer(nn.Module):
  width: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  norm_eps: float
  dtype: Any = jnp.float32
  qk_norm: bool = False           # see rvlm/models/layers.py (attention-plateau fix)
  logit_scale: str = "none"
  logit_scale_init: float = 1.0
  qkv_bias: bool = False          # HF-import options, see rvlm/models/presets.py
  out_bias: bool = False
  mlp_bias: bool = False

  @nn.compact
  def __call__(self, x, mask, positions, kv_cache=None, cache_index=None):
    """Returns x, or (x, updated kv_cache) when given a cache (see layers.Attention)."""
    h = layers.RMSNorm(self.norm_eps, name="attn_norm")(x)
    attn = layers.Attention(self.num_heads, self.num_kv_heads, self.head_dim,
                            self.rope_theta, self.dtype, qk_norm=self.qk_norm,
                            logit_scale=self.logit_scale,
                            logit_scale_init=self.logit_scale_init,
                            norm_eps=self.norm_eps, qkv_bias=self.qkv_bias,
                            out_bias=self.out_bias, name="attn")(h, mask, positions,
                                                                 kv_cache, cache_index)
    if kv_cache is not None:
      attn, kv_cache = attn
    x = x + attn
    h = layers.RMSNorm(self.norm_eps, name="mlp_norm")(x)
    x = layers.constrain(x + layers.SwiGLU(self.mlp_dim, self.dtype, use_bias=self.mlp_bias,
                                                 name="mlp")(h))
    return x if kv_cache is None else (x, kv_cache)


class _ScanBody(nn.Module):
  """One layer application (a scan iteration, or one layer of the layerwise stack):
  apply the layer, write its output to its connector slot (if any)."""
  layer_kwargs: dict
  remat_policy: str

  @nn.compact
  def __call__(self, carry, slot, mask, positions, kv_cache, cache_index):
    x, buf = carry
    layer_cls = DecoderLayer
    policy = layers.remat_policy(self.remat_policy)
    if policy is not None:
      layer_cls = nn.remat(DecoderLayer, policy=policy, prevent_cse=False)
    x = layer_cls(**self.layer_kwargs, name="layer")(x, mask, positions, kv_cache, cache_index)
    if kv_cache is not None:
      x, kv_cache = x
    if buf is not None:
      idx = jnp.maximum(slot, 0)
      buf = buf.at[idx].set(jnp.where(slot >= 0, x, buf[idx]))
    return (x, buf), kv_cache


class DecoderStack(nn.Module):
  """L distinct decoder layers; params stacked on a leading 'layers' axis.

  `scan=False` unrolls the same scan fully, so the param tree is identical either way.
  `layerwise=True` (decoding only) makes each layer its own submodule, `layer_0` ..
  `layer_{L-1}`, whose params `layerwise_params` slices out of the stacked tree once: a
  loop that applies the stack per token would otherwise slice (copy) every layer's
  weights out of the stacked arrays on every iteration, which XLA does not hoist.
  """
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  norm_eps: float
  num_sampled: int = 0          # k; 0 = return no intermediate layers
  scan: bool = True
  remat_policy: str = "none"
  dtype: Any = jnp.float32
  qk_norm: bool = False
  logit_scale: str = "none"
  logit_scale_init: float = 1.0
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  layerwise: bool = False

  @nn.compact
  def __call__(self, x, mask, positions, kv_cache=None, cache_index=None):
    """Returns (final output [B, N, d], sampled outputs [k, B, N, d] or None).

    With `kv_cache` = (k [L, B * K, D, S], v [L, B * K, S, D]) (one cache per layer, in
    the layouts rvlm.models.layers.Attention reads in place; for decoding:
    rvlm/decode.py), x's keys and values go to slots cache_index.. of every layer's
    cache, x attends over the cache under `mask` [B, 1, N, S], and the updated cache
    is returned as a third output. The layerwise stack takes and returns the cache as
    L separate (k, v) pairs, so that a decoding loop carrying them updates each layer's
    buffer in place: slicing a layer out of one [L, ...] array and stacking the layers
    back copies the whole cache on every token.
    """
    slots = np.full((self.depth,), -1, np.int32)
    if self.num_sampled:
      for s, layer in enumerate(sampled_layers(self.depth, self.num_sampled)):
        slots[layer - 1] = s
    layer_kwargs = dict(width=self.width, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, mlp_dim=self.mlp_dim, rope_theta=self.rope_theta,
                        norm_eps=self.norm_eps, dtype=self.dtype, qk_norm=self.qk_norm,
                        logit_scale=self.logit_scale, logit_scale_init=self.logit_scale_init,
                        qkv_bias=self.qkv_bias, out_bias=self.out_bias, mlp_bias=self.mlp_bias)
    if self.layerwise:
      # The layer index is static here, so the sampled outputs are collected as they
      # come (the scan writes them into `buf` at a traced slot, an update per layer).
      kv_out, sampled = [], []
      for i in range(self.depth):
        (x, _), kv = _ScanBody(layer_kwargs, self.remat_policy, name=f"layer_{i}")(
            (x, None), -1, mask, positions, None if kv_cache is None else kv_cache[i],
            cache_index)
        kv_out.append(kv)
        if slots[i] >= 0:
          sampled.append(x)
      buf = jnp.stack(sampled) if sampled else None
      kv_cache_out = None if kv_cache is None else tuple(kv_out)
    else:
      buf = jnp.zeros((self.num_sampled,) + x.shape, x.dtype) if self.num_sampled else None
      body = nn.scan(_ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                     in_axes=(0, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                     length=self.depth, unroll=1 if self.scan else self.depth,
                     metadata_params={nn.PARTITION_NAME: "layers"})
      (x, buf), kv_cache_out = body(layer_kwargs, self.remat_policy, name="layers")(
          (x, buf), jnp.asarray(slots), mask, positions, kv_cache, cache_index)
    return (x, buf) if kv_cache is None else (x, buf, kv_cache_out)


def layerwise_params(stack_params):
  """A DecoderStack's params (every layer's stacked under 'layers') as the layerwise
  stack's: {'layer_0': layer 0's subtree, ...}. Run it outside the loop that applies
  the stack, so that the slicing happens once."""
  layers = stack_params["layers"]
  depth = jax.tree.leaves(layers)[0].shape[0]
  return {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(depth)}
