"""Image encoder: a pre-norm ViT (SigLIP-style) with its blocks scanned over depth."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rvlm.models import layers


class VitBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  qk_norm: bool = False           # see rvlm/models/layers.py (attention-plateau fix)
  logit_scale: str = "none"
  logit_scale_init: float = 1.0
  norm_eps: float = 1e-6          # of ln1, ln2 and the QK-norm

  @nn.compact
  def __call__(self, x, _):
    ln = lambda name: layer_norm(self.norm_eps, self.dtype, name)  # noqa: E731
    x = x + layers.VitAttention(self.num_heads, self.dtype, qk_norm=self.qk_norm,
                                logit_scale=self.logit_scale,
                                logit_scale_init=self.logit_scale_init, norm_eps=self.norm_eps,
                                name="attn")(ln("ln1")(x))
    x = x + layers.GeluMLP(self.mlp_dim, dtype=self.dtype, name="mlp")(ln("ln2")(x))
    return layers.constrain(x), None


def layer_norm(eps, dtype, name):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def patchify(images, patch: int):
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major over the patch grid."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ViT(nn.Module):
  """Patch embedding (a linear map of flattened patches, equal to a strided conv),
  learned position embeddings, `depth` pre-norm blocks, a final LayerNorm (none with
  final_norm=False: LLaVA reads a layer's output without SigLIP's post-layernorm)."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  qk_norm: bool = False
  logit_scale: str = "none"
  logit_scale_init: float = 1.0
  norm_eps: float = 1e-6          # every LayerNorm (and the QK-norm)
  final_norm: bool = True         # False: no ln_final (no params)

  @nn.compact
  def __call__(self, images):
    x = patchify(images.astype(self.dtype), self.patch_size)
    x = layers.Dense((self.width,), ("patch", "vit_embed"), bias_axes=("vit_embed",),
                     dtype=self.dtype, name="patch_embed")(x)
    pos = self.param("pos_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vit_pos", "vit_embed")),
                     (x.shape[1], self.width), jnp.float32)
    x = x + pos.astype(self.dtype)[None]
    # depth 0 is a per-patch encoder: no patch sees another, so every relation between
    # patches has to be found by the decoder (configs/chase_small.py uses this).
    if self.depth:
      blocks = nn.scan(VitBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = blocks(self.num_heads, self.mlp_dim, self.dtype, qk_norm=self.qk_norm,
                    logit_scale=self.logit_scale, logit_scale_init=self.logit_scale_init,
                    norm_eps=self.norm_eps, name="blocks")(x, None)
    if not self.final_norm:
      return x
    return layer_norm(self.norm_eps, self.dtype, "ln_final")(x)


class Projector(nn.Module):
  """Image features -> decoder width: `linear` or a 2-layer GELU `mlp` (GELU `act`:
  'gelu_tanh' or the exact 'gelu')."""
  kind: str
  width: int
  dtype: Any = jnp.float32
  act: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x):
    if self.kind == "linear":
      return layers.Dense((self.width,), ("vit_embed", "embed"), bias_axes=("embed",),
                          dtype=self.dtype, name="linear")(x)
    if self.kind == "mlp":
      return layers.GeluMLP(self.width, in_axis="vit_embed", hidden_axis="mlp", out_axis="embed",
                            out_features=self.width, dtype=self.dtype, act=self.act,
                            name="mlp")(x)
    raise ValueError(f"config.model.projector.kind={self.kind!r} is unknown; choose 'linear' or 'mlp'")
