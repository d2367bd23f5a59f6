"""The Recursive Connector (RecursiveVLM): builds the next recursion step's input.

  n_l   = RMSNorm_l(H_l^(r))                      for the k sampled layers l
  P_l   = C_(l, m(t))(n_l)                        modality-specific: image / text weights
  F^(r) = fuse_l P_l                              mean, or learned softmax weights
  E_(r+1) = base + alpha * F^(r)                  base = E_0 (default), E_r, or nothing

rvlm's sequence layout puts the image tokens first, so the modality of a position is a
static split at `num_image_tokens`: each modality's weights run only on its own tokens.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PROJECTIONS = ("linear", "mlp")
FUSIONS = ("mean", "softmax")
BASES = ("embed", "prev", "none")
ALPHA_SHAPES = ("channel", "scalar")
INITS = ("zeros", "normal")


def _mean_over_layers(x):
  """jnp.mean(x, axis=0) for a short leading axis, as a chain of adds.

  The same value to the last bit (f32 accumulation, then the divide, as jnp.mean does),
  but XLA:CPU sends a reduce over a major axis to YNNPACK, which ran it ~25x slower than
  the adds fused into one loop: 5.7 against 0.24 ms for [4, 64, 40, 128], 17 ms of the
  default step (docs/performance.md).
  """
  xf = x.astype(jnp.float32)
  total = xf[0]
  for i in range(1, x.shape[0]):
    total = total + xf[i]
  return (total / x.shape[0]).astype(x.dtype)


class Connector(nn.Module):
  num_layers: int                 # k
  num_image_tokens: int
  projection: str = "linear"
  modality_specific: bool = True
  fusion: str = "mean"
  base: str = "embed"
  alpha_init: float = 1.0
  alpha_shape: str = "channel"
  init: str = "zeros"
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  # Decoding only: each modality's kernels as params of their own (`proj_0`, `proj_1`,
  # ..., from split_modality_params, sliced once outside the decoding loop); slicing a
  # modality out of the [k, M, d, d] kernel copies it, on every step of every token.
  split_modalities: bool = False

  def _kernel(self, name, shape, init):
    """The kernel `name` [k, M, d, e] as a list over the M modalities of [k, d, e]."""
    if self.split_modalities:
      axes = ("connector_layers", "embed", "embed_out")
      per = shape[:1] + shape[2:]
      return [self.param(f"{name}_{m}", nn.with_logical_partitioning(init, axes), per,
                         jnp.float32) for m in range(shape[1])]
    axes = ("connector_layers", "modality", "embed", "embed_out")
    w = self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    return [w[:, m] for m in range(shape[1])]

  def _project(self, x, kernels, m):
    """x: [k, B, n, d] tokens of modality m -> [k, B, n, d] (batched 2-D matmuls over k)."""
    k, b, n, d = x.shape
    mm = lambda a, w: jnp.einsum("kxd,kde->kxe", a, w[m].astype(self.dtype))  # noqa: E731
    y = mm(x.reshape(k, b * n, d), kernels[0])
    if self.projection == "mlp":
      y = mm(nn.gelu(y, approximate=True), kernels[1])
    return y.reshape(k, b, n, -1)

  @nn.compact
  def __call__(self, sampled, e0, e_prev, num_image_tokens=None):
    """sampled: [k, B, N, d] outputs of the sampled layers; e0, e_prev: [B, N, d].

    `num_image_tokens` overrides how many leading positions are image tokens: a
    decoded chunk of text tokens (rvlm/decode.py) passes 0.
    """
    k, _, _, d = sampled.shape
    num_mod = 2 if self.modality_specific else 1
    scale = self.param("norm_scale", nn.with_logical_partitioning(
        nn.initializers.ones, ("connector_layers", "norm")), (k, d), jnp.float32)
    xf = sampled.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.norm_eps)
    normed = (normed * scale[:, None, None, :]).astype(self.dtype)

    out_init = (nn.initializers.zeros if self.init == "zeros"
                else nn.initializers.normal(d ** -0.5))
    if self.projection == "linear":
      kernels = (self._kernel("proj", (k, num_mod, d, d), out_init),)
    else:
      kernels = (self._kernel("proj_in", (k, num_mod, d, d), nn.initializers.normal(d ** -0.5)),
                 self._kernel("proj_out", (k, num_mod, d, d), out_init))

    if self.modality_specific:
      nv = self.num_image_tokens if num_image_tokens is None else num_image_tokens
      parts = [(normed[:, :, :nv], 0), (normed[:, :, nv:], 1)]
      projected = jnp.concatenate([self._project(x, kernels, m) for x, m in parts
                                   if x.shape[2]], axis=2)
    else:
      projected = self._project(normed, kernels, 0)

    if self.fusion == "mean":
      fused = _mean_over_layers(projected)
    else:
      logits = self.param("fusion_logits", nn.with_logical_partitioning(
          nn.initializers.zeros, ("connector_layers",)), (k,), jnp.float32)
      weights = jax.nn.softmax(logits).astype(self.dtype)
      fused = jnp.einsum("k,kbnd->bnd", weights, projected)

    alpha_shape = (d,) if self.alpha_shape == "channel" else ()
    alpha_axes = ("norm",) if self.alpha_shape == "channel" else ()
    alpha = self.param("alpha", nn.with_logical_partitioning(
        nn.initializers.constant(self.alpha_init), alpha_axes), alpha_shape, jnp.float32)
    update = alpha.astype(self.dtype) * fused
    if self.base == "embed":
      return e0 + update
    if self.base == "prev":
      return e_prev + update
    return update


def split_modality_params(params):
  """A Connector's params as the split_modalities one's: each [k, M, d, e] kernel
  `name` becomes `name_0` .. `name_{M-1}`, [k, d, e] each."""
  out = {}
  for name, value in params.items():
    if name.startswith("proj"):
      out.update({f"{name}_{m}": value[:, m] for m in range(value.shape[1])})
    else:
      out[name] = value
  return out
