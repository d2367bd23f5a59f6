"""A plain-PyTorch reference of rvlm's training step, for performance comparisons.

The same model (ViT + projector, the decoder stack run R times with the Recursive
Connector, tied head), the same loss (the Monotonic Recursion Loss, rvlm/losses.py) and
the same optimizer (clip by global norm -> AdamW with the no_decay / freeze masks and
the warmup + cosine schedule, rvlm/optim.py), written directly in torch: no flax, no
scans, no sharding. It loads rvlm's param tree, so a loss on the same batch can be
checked against rvlm's before anything is timed (`time_train` does).

  model = TorchVLM(config.model)
  load_params(model, rvlm_init_params(config))       # rvlm's initial params
  opt = AdamW(model, config.optim, config.train.total_steps)
  loss = train_step(model, opt, to_torch_batch(batch), config.loss)
  timing = time_train(config, 64, iters=10, compile=True, threads=2, batch=batch)
  row = benchmark(config, iters=10, threads=2)          # eager and compiled, as a dict

The numpy reference (tests/numpy_reference.py) is the guide to the math; this module
is written for speed instead: batched heads, torch's fused attention, one matmul per
projection. Params keep rvlm's layout and names (`params.vit.blocks.attn.q.kernel` is
flax's `vit/blocks/attn/q/kernel`, layers stacked on a leading axis) and are unbound
into per-layer views once per forward, so autograd sums each layer's gradient over the
R recursion steps and writes the stacked gradient once. Options the reference does
not implement raise NotImplementedError (`check_supported`) rather than compute
something else.

Importing this module needs torch and numpy only; jax is imported by the helpers that
run rvlm itself (`rvlm_init_params`, `rvlm_loss`, and `time_train` when it has to
compute rvlm's loss for the parity check).
"""
import dataclasses
import math
import os
import re
import sys
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------
# The options covered.
# ----------------------------------------------------------------------------------------

def check_supported(cfg) -> None:
  """Raises NotImplementedError naming the first `config.model` option this reference
  does not mirror (each would change the numerics or the param tree)."""
  def no(field, value, default):
    if value != default:
      raise NotImplementedError(
          f"benchmarks/torch_reference.py does not implement config.model.{field}={value!r} "
          f"(only {default!r})")
  no("dtype", cfg.dtype, "float32")
  no("param_dtype", cfg.param_dtype, "float32")
  for part in ("decoder", "vit"):
    no(f"{part}.qk_norm", cfg[part].qk_norm, False)
    no(f"{part}.logit_scale", cfg[part].logit_scale, "none")
  for field in ("qkv_bias", "out_bias", "mlp_bias"):
    no(f"decoder.{field}", cfg.decoder[field], False)
  if cfg.recursion.mode == "connector":
    no("connector.projection", cfg.connector.projection, "linear")
    no("connector.fusion", cfg.connector.fusion, "mean")
  # The rest is validated by rvlm itself (rvlm.models.vlm.check_model_config); these
  # are the choices whose names this module branches on.
  for field, value, choices in [
      ("recursion.mode", cfg.recursion.mode, ("none", "vanilla", "connector")),
      ("projector.kind", cfg.projector.kind, ("linear", "mlp")),
      ("projector.act", cfg.projector.act, ("gelu_tanh", "gelu")),
      ("attention", cfg.attention, ("prefix", "causal")),
      ("connector.base", cfg.connector.base, ("embed", "prev", "none")),
      ("connector.alpha_shape", cfg.connector.alpha_shape, ("channel", "scalar"))]:
    if value not in choices:
      raise NotImplementedError(f"config.model.{field}={value!r}: not one of {choices}")
  if cfg.recursion.mode == "none" and cfg.recursion.num_steps != 1:
    raise ValueError("config.model.recursion.mode 'none' needs num_steps = 1")


def num_image_tokens(cfg) -> int:
  return (cfg.vit.image_size // cfg.vit.patch_size) ** 2


def sampled_layers(depth: int, k: int) -> list[int]:
  """The connector's 1-indexed layers ceil(i * L / k), i = 1..k (rvlm/models/decoder.py)."""
  return [-(-i * depth // k) for i in range(1, k + 1)]


def param_shapes(cfg) -> dict:
  """rvlm's param tree for `cfg` as nested dicts of shapes (flax's kernel layout:
  [in..., out...], decoder and ViT blocks stacked on a leading layer axis)."""
  vit, dec, con = cfg.vit, cfg.decoder, cfg.connector
  w, d, L = vit.width, dec.width, dec.depth
  hv, hd = vit.num_heads, vit.width // vit.num_heads
  ln = lambda *lead: {"scale": lead + (w,), "bias": lead + (w,)}  # noqa: E731
  shapes = {
      "vit": {"patch_embed": {"kernel": (vit.patch_size ** 2 * 3, w), "bias": (w,)},
              "pos_embedding": (num_image_tokens(cfg), w)},
      "embed": {"embedding": (cfg.vocab_size, d)},
      "final_norm": {"scale": (d,)},
  }
  if vit.depth:
    lv = vit.depth
    qkv = {"kernel": (lv, w, hv, hd), "bias": (lv, hv, hd)}
    shapes["vit"]["blocks"] = {
        "ln1": ln(lv), "ln2": ln(lv),
        "attn": {"q": qkv, "k": qkv, "v": qkv, "o": {"kernel": (lv, hv, hd, w), "bias": (lv, w)}},
        "mlp": {"fc1": {"kernel": (lv, w, vit.mlp_dim), "bias": (lv, vit.mlp_dim)},
                "fc2": {"kernel": (lv, vit.mlp_dim, w), "bias": (lv, w)}}}
  if vit.final_norm:
    shapes["vit"]["ln_final"] = ln()
  if cfg.projector.kind == "linear":
    shapes["projector"] = {"linear": {"kernel": (w, d), "bias": (d,)}}
  else:  # a 2-layer GELU MLP of hidden width d
    shapes["projector"] = {"mlp": {"fc1": {"kernel": (w, d), "bias": (d,)},
                                   "fc2": {"kernel": (d, d), "bias": (d,)}}}
  layer = {
      "attn_norm": {"scale": (L, d)}, "mlp_norm": {"scale": (L, d)},
      "attn": {"q": {"kernel": (L, d, dec.num_heads, dec.head_dim)},
               "k": {"kernel": (L, d, dec.num_kv_heads, dec.head_dim)},
               "v": {"kernel": (L, d, dec.num_kv_heads, dec.head_dim)},
               "o": {"kernel": (L, dec.num_heads, dec.head_dim, d)}},
      "mlp": {"gate": {"kernel": (L, d, dec.mlp_dim)}, "up": {"kernel": (L, d, dec.mlp_dim)},
              "down": {"kernel": (L, dec.mlp_dim, d)}}}
  step = {"stack": {"layers": {"layer": layer}}}
  if cfg.recursion.mode == "connector":
    k, mods = con.num_layers, 2 if con.modality_specific else 1
    step["connector"] = {"norm_scale": (k, d), "proj": (k, mods, d, d),
                         "alpha": (d,) if con.alpha_shape == "channel" else ()}
  shapes["recursion"] = {"step": step}
  if not cfg.tie_embeddings:
    shapes["lm_head"] = {"kernel": (d, cfg.vocab_size)}
  return shapes


# ----------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------

class _ParamTree(nn.Module):
  """Nested modules whose attribute names are rvlm's param-tree keys."""

  def __init__(self, shapes: dict):
    super().__init__()
    for name, value in shapes.items():
      if isinstance(value, dict):
        self.add_module(name, _ParamTree(value))
      else:
        self.register_parameter(name, nn.Parameter(torch.zeros(value)))


def _dense(x, w, b=None):
  """x [..., in] @ w [in, out] (+ b): flax's kernel layout, no transposes."""
  if b is None:
    return x @ w
  return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[-1])


def _rms_norm(x, scale, eps):
  return F.rms_norm(x, (x.shape[-1],), scale, eps)


def _rope_tables(positions, head_dim, theta):
  """cos, sin [B, N, 1, D/2] of rvlm's rotate-half RoPE, computed in float32 as rvlm does."""
  inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
  ang = positions.to(torch.float32)[..., None] * inv_freq
  return torch.cos(ang)[:, :, None, :], torch.sin(ang)[:, :, None, :]


def _rope(x, cos, sin):
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TorchVLM(nn.Module):
  """rvlm.models.vlm.VLM in torch, built from a `config.model`; params from `load_params`.

  `forward(batch)` returns the final-layer hidden states of every recursion step on the
  text positions, [R, B, T, d], and `logits` applies the shared final norm + head, as
  rvlm's VLM does.
  """

  def __init__(self, model_config):
    super().__init__()
    check_supported(model_config)
    c = model_config
    # Plain Python values: torch.compile guards on them cheaply (not on a ConfigDict).
    self.patch = c.vit.patch_size
    self.vit_depth, self.vit_heads, self.vit_eps = c.vit.depth, c.vit.num_heads, c.vit.norm_eps
    self.vit_final_norm = c.vit.final_norm
    self.projector_kind = c.projector.kind
    self.projector_gelu = "tanh" if c.projector.act == "gelu_tanh" else "none"
    self.causal = c.attention == "causal"
    self.num_image_tokens = num_image_tokens(c)
    dec = c.decoder
    self.num_heads, self.num_kv_heads = dec.num_heads, dec.num_kv_heads
    self.head_dim, self.rope_theta, self.eps = dec.head_dim, dec.rope_theta, dec.norm_eps
    self.mode, self.num_steps = c.recursion.mode, c.recursion.num_steps
    self.tie_embeddings = c.tie_embeddings
    con = c.connector
    self.sampled = sampled_layers(dec.depth, con.num_layers) if self.mode == "connector" else []
    self.modality_specific, self.connector_base = con.modality_specific, con.base
    self.params = _ParamTree(param_shapes(c))

  # -- image encoder ---------------------------------------------------------------------

  def vit(self, images):
    """[B, H, W, C] -> [B, n, w]: patchify (row-major grid, (row, col, channel) inside a
    patch), linear embed, learned positions, pre-LN blocks, final LayerNorm."""
    p = self.params.vit
    b, h, w, c = images.shape
    s = self.patch
    x = images.reshape(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, (h // s) * (w // s), s * s * c)
    x = _dense(x, p.patch_embed.kernel, p.patch_embed.bias) + p.pos_embedding
    width = x.shape[-1]
    ln = lambda y, m, i: F.layer_norm(  # noqa: E731
        y, (width,), m.scale[i], m.bias[i], self.vit_eps)
    heads = self.vit_heads
    for i in range(self.vit_depth):
      blk = p.blocks
      a = blk.attn
      y = ln(x, blk.ln1, i)
      q, k, v = [_dense(y, m.kernel[i].flatten(1), m.bias[i].flatten())
                 .view(b, -1, heads, width // heads).transpose(1, 2) for m in (a.q, a.k, a.v)]
      out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
      x = x + _dense(out, a.o.kernel[i].flatten(0, 1), a.o.bias[i])
      y = ln(x, blk.ln2, i)
      y = F.gelu(_dense(y, blk.mlp.fc1.kernel[i], blk.mlp.fc1.bias[i]), approximate="tanh")
      x = x + _dense(y, blk.mlp.fc2.kernel[i], blk.mlp.fc2.bias[i])
    if not self.vit_final_norm:
      return x
    return F.layer_norm(x, (width,), p.ln_final.scale, p.ln_final.bias, self.vit_eps)

  def projector(self, x):
    p = self.params.projector
    if self.projector_kind == "linear":
      return _dense(x, p.linear.kernel, p.linear.bias)
    h = F.gelu(_dense(x, p.mlp.fc1.kernel, p.mlp.fc1.bias), approximate=self.projector_gelu)
    return _dense(h, p.mlp.fc2.kernel, p.mlp.fc2.bias)

  # -- decoder ---------------------------------------------------------------------------

  def _layer_weights(self):
    """Per-layer 2-D views of the stacked decoder params, one tuple per layer."""
    p = self.params.recursion.step.stack.layers.layer
    stacked = [p.attn_norm.scale, p.attn.q.kernel.flatten(2), p.attn.k.kernel.flatten(2),
               p.attn.v.kernel.flatten(2), p.attn.o.kernel.flatten(1, 2), p.mlp_norm.scale,
               p.mlp.gate.kernel, p.mlp.up.kernel, p.mlp.down.kernel]
    return list(zip(*[t.unbind(0) for t in stacked]))

  def _decoder_layer(self, x, weights, attn_bias, cos, sin):
    """Pre-norm block: x + GQA(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""
    attn_norm, wq, wk, wv, wo, mlp_norm, wg, wu, wd = weights
    b, n, _ = x.shape
    kh, g, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
    h = _rms_norm(x, attn_norm, self.eps)
    q = _rope(_dense(h, wq).view(b, n, kh * g, hd), cos, sin)
    k = _rope(_dense(h, wk).view(b, n, kh, hd), cos, sin)
    v = _dense(h, wv).view(b, n, kh, hd)
    # rvlm's GQA: query head kv * G + g reads kv head kv. The G query heads of a kv head
    # are folded into the query length, so K/V are never repeated (as rvlm does).
    q = q.view(b, n, kh, g, hd).permute(0, 2, 3, 1, 4).reshape(b, kh, g * n, hd)
    out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_bias)
    out = out.view(b, kh, g, n, hd).permute(0, 3, 1, 2, 4).reshape(b, n, kh * g * hd)
    x = x + _dense(out, wo)
    h = _rms_norm(x, mlp_norm, self.eps)
    return x + _dense(F.silu(_dense(h, wg)) * _dense(h, wu), wd)

  def _connector(self, sampled, e0, e_prev):
    """E_(r+1) = base + alpha * mean_l C_(l, modality)(RMSNorm_l(H_l)), as
    rvlm/models/connector.py (linear projections, mean fusion)."""
    p = self.params.recursion.step.connector
    x = torch.stack(sampled)                                        # [k, B, N, d]
    k, b, n, d = x.shape
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * p.norm_scale[:, None, None]
    if self.modality_specific:  # image tokens first: a static split
      nv = self.num_image_tokens
      parts = [(x[:, :, :nv], 0), (x[:, :, nv:], 1)]
    else:
      parts = [(x, 0)]
    projected = torch.cat([torch.bmm(part.reshape(k, -1, d), p.proj[:, m]).view(k, b, -1, d)
                           for part, m in parts if part.shape[2]], dim=2)
    update = p.alpha * projected.mean(0)
    if self.connector_base == "embed":
      return e0 + update
    if self.connector_base == "prev":
      return e_prev + update
    return update

  def _masks(self, batch, b, nv):
    """The additive attention bias [B, 1, N, N] of rvlm's prefix-LM (or causal) mask, and
    the RoPE positions [B, N] (index among real tokens)."""
    image_mask = batch["image_mask"].to(torch.int64)
    input_mask = torch.cat([image_mask[:, None].expand(b, nv),
                            batch["input_mask"].to(torch.int64)], 1)
    if self.causal:
      mask_ar = torch.ones_like(input_mask)
    else:
      mask_ar = torch.cat([torch.zeros_like(input_mask[:, :nv]),
                           batch["mask_ar"].to(torch.int64)], 1)
    cum = torch.cumsum(mask_ar, -1)
    real = input_mask.bool()
    visible = (cum[:, None, :] <= cum[:, :, None]) & real[:, None, :] & real[:, :, None]
    # rvlm puts float32's minimum on hidden logits (not -inf): a query with no visible
    # key (padding) then attends uniformly instead of producing NaN, exactly as in rvlm.
    bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(
        ~visible, torch.finfo(torch.float32).min)[:, None]
    positions = torch.clamp(torch.cumsum(input_mask, -1) - 1, min=0)
    return bias, positions

  def forward(self, batch, num_steps: int | None = None):
    tokens = batch["tokens"]
    b = tokens.shape[0]
    img = self.projector(self.vit(batch["image"]))
    img = img * batch["image_mask"].to(img.dtype)[:, None, None]
    e0 = torch.cat([img, F.embedding(tokens, self.params.embed.embedding)], 1)
    nv = img.shape[1]
    bias, positions = self._masks(batch, b, nv)
    # The folded GQA queries (see _decoder_layer) need the mask once per group.
    bias = bias.repeat(1, 1, self.num_heads // self.num_kv_heads, 1)
    cos, sin = _rope_tables(positions, self.head_dim, self.rope_theta)
    layers = self._layer_weights()
    sampled_at = {layer - 1: s for s, layer in enumerate(self.sampled)}
    e, hidden = e0, []
    for _ in range(self.num_steps if num_steps is None else num_steps):
      x, sampled = e, []
      for i, weights in enumerate(layers):
        x = self._decoder_layer(x, weights, bias, cos, sin)
        if i in sampled_at:
          sampled.append(x)
      hidden.append(x[:, nv:])
      e = self._connector(sampled, e0, e) if self.mode == "connector" else x
    return torch.stack(hidden)

  def logits(self, hidden):
    """The shared final RMSNorm + LM head (tied: the embedding's transpose)."""
    h = _rms_norm(hidden, self.params.final_norm.scale, self.eps)
    if self.tie_embeddings:
      return h @ self.params.embed.embedding.t()
    return h @ self.params.lm_head.kernel


def flax_path(torch_name: str) -> str:
  """'params.vit.blocks.attn.q.kernel' -> 'vit/blocks/attn/q/kernel' (rvlm's path)."""
  return torch_name.removeprefix("params.").replace(".", "/")


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if hasattr(value, "items"):
      out.update(_flatten(value, path))
    else:
      out[path] = value
  return out


@torch.no_grad()
def load_params(module: TorchVLM, flax_params) -> None:
  """Copies rvlm's (unboxed) param tree of numpy / jax arrays into `module`.

  The trees must hold exactly the same paths and shapes: an rvlm option that adds
  params the reference does not know about fails here, not as a silent difference.
  """
  # Copies: jax arrays convert to read-only numpy views, which torch will not wrap.
  src = {k: np.array(v, dtype=np.float32) for k, v in _flatten(flax_params).items()}
  dst = {flax_path(n): p for n, p in module.named_parameters()}
  if set(src) != set(dst):
    raise ValueError(f"param trees differ: only in rvlm {sorted(set(src) - set(dst))}, "
                     f"only in the torch reference {sorted(set(dst) - set(src))}")
  for path, p in dst.items():
    if tuple(src[path].shape) != tuple(p.shape):
      raise ValueError(f"{path}: rvlm shape {src[path].shape}, torch {tuple(p.shape)}")
    p.copy_(torch.as_tensor(src[path]))


def params_as_numpy(module: TorchVLM) -> dict:
  """{rvlm path: float32 numpy array} of the module's current params."""
  return {flax_path(n): p.detach().numpy().copy() for n, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------------------

def to_torch_batch(batch) -> dict:
  """The model's inputs from a numpy batch (benchmarks/train_step.py:synthetic_batch's
  keys): float32 image, int64 tokens (for embedding / cross_entropy), integer masks."""
  out = {"image": torch.as_tensor(np.asarray(batch["image"], np.float32))}
  for key in ("image_mask", "tokens", "input_mask", "mask_ar", "mask_loss"):
    out[key] = torch.as_tensor(np.asarray(batch[key], np.int64))
  return out


def token_losses(model: TorchVLM, batch):
  """Next-token cross-entropy at every step, [R, B, T - 1]: position t predicts t + 1.

  All R steps' logits at once: rvlm scans the head over steps to bound memory at large
  vocabularies, which changes no value.
  """
  hidden = model(batch)[:, :, :-1]
  logits = model.logits(hidden)
  targets = batch["tokens"][:, 1:].expand(hidden.shape[0], -1, -1)
  loss = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none")
  return loss.view(targets.shape)


def recursion_loss(tok, mask, *, kind="monotonic", beta=2.0, form="hard", gamma=1.0,
                   step_weights=()):
  """rvlm.losses.recursion_loss's total: tok [R, B, T'] per-token losses, mask [B, T'].

    w_i^(r) = beta if r > 1 and sg(l_i^(r)) > sg(l_i^(r-1)) else 1 ('hard'),
    L = sum_r lambda_r * sum_i m_i w_i^(r) l_i^(r) / max(sum_i m_i, 1);
  'soft' replaces w l by l + gamma * SiLU(l^(r) - sg(l^(r-1))) for r > 1, and
  'final_only' is the last step's mean alone.
  """
  mask = mask.to(tok.dtype)
  denom = mask.sum().clamp(min=1.0)
  mean = lambda x: (x * mask).sum((-2, -1)) / denom  # noqa: E731  (per step)
  if kind == "final_only":
    return mean(tok[-1])
  lam = torch.tensor(tuple(step_weights) or (1.0,) * tok.shape[0], dtype=tok.dtype)
  sg = tok.detach()  # the comparison carries no gradient
  if form == "hard":
    rose = torch.cat([torch.zeros_like(sg[:1], dtype=torch.bool), sg[1:] > sg[:-1]])
    return (lam * mean(tok * torch.where(rose, beta, 1.0))).sum()
  soft = torch.cat([tok[:1], tok[1:] + gamma * F.silu(tok[1:] - sg[:-1])])
  return (lam * mean(soft)).sum()


def make_loss_fn(loss_config) -> Callable:
  """`fn(model, batch) -> total`: what rvlm/steps.py's train step minimises for
  `config.loss`, with its options bound as plain Python values (torch.compile then sees
  constants, not a ConfigDict). Supervised tokens: mask_loss[:, 1:], as rvlm's."""
  c = loss_config
  if c.kind not in ("monotonic", "final_only") or c.form not in ("hard", "soft"):
    raise NotImplementedError(f"config.loss kind={c.kind!r} form={c.form!r} is not implemented")
  options = dict(kind=c.kind, beta=float(c.beta), form=c.form, gamma=float(c.gamma),
                 step_weights=tuple(float(w) for w in c.step_weights))

  def fn(model, batch):
    return recursion_loss(token_losses(model, batch), batch["mask_loss"][:, 1:], **options)

  return fn


def loss_fn(model: TorchVLM, batch, loss_config):
  """rvlm's training loss (the trainer's objective) of `batch` (torch tensors)."""
  return make_loss_fn(loss_config)(model, batch)


# ----------------------------------------------------------------------------------------
# The optimizer.
# ----------------------------------------------------------------------------------------

def lr_at(optim_config, total_steps: int, step: int) -> float:
  """rvlm.optim.make_schedule's value at `step` (optax counts steps from 0): linear
  warmup 0 -> lr over warmup_steps, then cosine to end_lr_factor * lr (or constant)."""
  c = optim_config
  warmup = int(c.warmup_steps)
  if step < warmup:
    return c.lr * step / warmup
  if c.schedule == "constant":
    return float(c.lr)
  decay = max(total_steps - warmup, 1)
  t = min(step - warmup, decay)
  return c.lr * ((1 - c.end_lr_factor) * 0.5 * (1 + math.cos(math.pi * t / decay))
                 + c.end_lr_factor)


class AdamW:
  """rvlm.optim.make_optimizer in torch: chain(clip_by_global_norm, adamw(schedule,
  mask=not no_decay)), with `freeze` params kept fixed and out of the norm.

  optax's adamw decays by lr * wd * param beside the Adam update (decoupled), which is
  torch.optim.AdamW's rule; both use eps = 1e-8 outside the square root of the
  bias-corrected second moment, and count Adam steps from 1. Clipping is done here,
  as optax does it (g * max_norm / norm when norm >= max_norm; torch's
  clip_grad_norm_ adds 1e-6 to the norm).
  """

  def __init__(self, model: TorchVLM, optim_config, total_steps: int, impl: str = "fused"):
    c = optim_config
    if c.name != "adamw" or c.schedule not in ("cosine", "constant"):
      raise NotImplementedError(f"config.optim name={c.name!r} schedule={c.schedule!r}")
    self.config, self.total_steps, self.step_count = c, int(total_steps), 0
    no_decay = [re.compile(r) for r in c.no_decay]
    freeze = [re.compile(r) for r in c.freeze]
    groups = {"decay": [], "no_decay": []}
    for name, p in model.named_parameters():
      path = flax_path(name)
      if any(r.fullmatch(path) for r in freeze):
        p.requires_grad_(False)
        continue
      groups["no_decay" if any(r.fullmatch(path) for r in no_decay) else "decay"].append(p)
    self.params = groups["decay"] + groups["no_decay"]
    self.max_norm = float(c.grad_clip)
    # impl: 'fused' (one C++ kernel per param group), 'foreach' or 'loop'.
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "loop": {"foreach": False}}[impl]
    self.opt = torch.optim.AdamW(
        [{"params": groups["decay"], "weight_decay": float(c.weight_decay)},
         {"params": groups["no_decay"], "weight_decay": 0.0}],
        lr=lr_at(c, self.total_steps, 0), betas=(c.b1, c.b2), eps=1e-8, **kwargs)
    self.grad_norm = None

  def zero_grad(self):
    self.opt.zero_grad(set_to_none=True)

  @torch.no_grad()
  def step(self):
    """Clip, then one AdamW update at the schedule's lr for this step."""
    for p in self.params:  # optax updates (decays, moves moments of) unused params too
      if p.grad is None:
        p.grad = torch.zeros_like(p)
    grads = [p.grad for p in self.params]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    self.grad_norm = norm
    if self.max_norm > 0 and norm >= self.max_norm:
      torch._foreach_mul_(grads, self.max_norm / norm)
    lr = lr_at(self.config, self.total_steps, self.step_count)
    for group in self.opt.param_groups:
      group["lr"] = lr
    self.opt.step()
    self.step_count += 1


def train_step(model: TorchVLM, opt: AdamW, batch, loss_config, loss=None):
  """One update: forward, backward, clip, AdamW. Returns the loss (before the update).

  `loss`: a `make_loss_fn(loss_config)` result to use instead, e.g. torch.compile'd.
  """
  fn = loss or make_loss_fn(loss_config)
  opt.zero_grad()
  total = fn(model, batch)
  total.backward()
  opt.step()
  return total.detach()


# ----------------------------------------------------------------------------------------
# rvlm's side: initial params and loss (imports jax).
# ----------------------------------------------------------------------------------------

def rvlm_init_params(config) -> dict:
  """The trainer's initial params (rvlm.train.init_train_state for config.seed), as a
  nested dict of float32 numpy arrays."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import linen as flax_nn  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from rvlm import train  # pylint: disable=g-import-not-at-top
  from rvlm.models import vlm  # pylint: disable=g-import-not-at-top
  # The trainer's own init (its rng split included); the optimizer state is not needed.
  init = functools.partial(train.init_train_state, model=vlm.make_model(config.model),
                           tx=optax.identity(), config=config)
  params = jax.jit(init)(jax.random.PRNGKey(config.seed))["params"]
  return jax.tree.map(np.asarray, flax_nn.meta.unbox(params))


def rvlm_loss(config, params, batch) -> float:
  """rvlm's training loss of `batch` (numpy) at `params` (the trainer's objective)."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from rvlm import steps  # pylint: disable=g-import-not-at-top
  from rvlm.models import vlm  # pylint: disable=g-import-not-at-top
  # The trainer's own objective (rvlm/steps.py), not a re-derivation of it.
  fn = functools.partial(steps._loss_fn,  # pylint: disable=protected-access
                         model=vlm.make_model(config.model), loss_cfg=config.loss)
  keys = ("image", "image_mask", "tokens", "input_mask", "mask_ar", "mask_loss")
  return float(jax.jit(fn)(params, {k: batch[k] for k in keys})[0])


def _synthetic_batch(config, batch_size):
  """benchmarks/train_step.py's synthetic_batch: the batch rvlm's step is timed on."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  return train_step.synthetic_batch(config, batch_size)


# ----------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
  """What `time_train` measured. `error` is set (and the speeds are NaN) when the run
  could not be timed: torch.compile failed, or (strict=False) the loss check did."""
  compiled: bool
  threads: int
  batch_size: int
  iters: int
  examples_per_s: float = float("nan")
  step_s: float = float("nan")         # median over the timed steps
  first_step_s: float = float("nan")   # includes torch.compile's tracing and codegen
  loss: float = float("nan")           # the reference's loss at step 1 (initial params)
  rvlm_loss: float = float("nan")
  loss_rel_diff: float = float("nan")
  error: str | None = None


class ParityError(AssertionError):
  """The reference's loss differs from rvlm's on the same params and batch."""


def time_train(config, batch_size: int, iters: int,
               compile: bool, threads: int, *,  # pylint: disable=redefined-builtin
               batch=None, params=None, expected_loss: float | None = None,
               rtol: float = 1e-5, warmup: int = 2, strict: bool = True) -> Timing:
  """Examples/s of the reference's train step for `config`, eager or under torch.compile.

  batch: numpy dict (default: benchmarks/train_step.py's synthetic_batch of batch_size);
  params: rvlm's param tree (default: the trainer's initial params for config.seed);
  expected_loss: rvlm's loss of batch at params (default: computed here with rvlm).
  The first step's loss (initial params) must equal expected_loss within `rtol`, else
  nothing is timed: ParityError is raised (strict) or the Timing returned with `error`.
  Then `warmup` - 1 more untimed steps and `iters` timed ones (the median is reported);
  every step is a real update, as in rvlm's benchmark. Runs at `threads` torch threads
  (restored afterwards).
  """
  if int(config.train.grad_accum_steps) != 1:
    raise NotImplementedError("the torch reference does not accumulate gradients "
                              "(config.train.grad_accum_steps must be 1)")
  timing = Timing(compiled=compile, threads=threads, batch_size=batch_size, iters=iters)
  batch = _synthetic_batch(config, batch_size) if batch is None else batch
  if len(batch["tokens"]) != batch_size:
    raise ValueError(f"batch has {len(batch['tokens'])} examples, batch_size={batch_size}")
  params = rvlm_init_params(config) if params is None else params
  if expected_loss is None:
    expected_loss = rvlm_loss(config, params, batch)
  timing.rvlm_loss = expected_loss

  previous_threads = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    model = TorchVLM(config.model)
    load_params(model, params)
    opt = AdamW(model, config.optim, config.train.total_steps)
    tbatch = to_torch_batch(batch)
    fn = make_loss_fn(config.loss)
    if compile:
      fn = torch.compile(fn)
    t0 = time.perf_counter()
    try:
      loss = float(train_step(model, opt, tbatch, config.loss, fn))
    except Exception as e:  # pylint: disable=broad-except
      if not compile:
        raise
      timing.error = f"torch.compile failed: {type(e).__name__}: {e}"
      return timing
    timing.first_step_s = time.perf_counter() - t0
    timing.loss = loss
    timing.loss_rel_diff = abs(loss - expected_loss) / max(abs(expected_loss), 1e-12)
    if not timing.loss_rel_diff <= rtol:
      timing.error = (f"torch reference loss {loss!r} != rvlm's {expected_loss!r} (relative "
                      f"difference {timing.loss_rel_diff:.2e} > rtol {rtol:g})")
      if strict:
        raise ParityError(timing.error)
      return timing
    for _ in range(warmup - 1):
      train_step(model, opt, tbatch, config.loss, fn)
    times = []
    for _ in range(iters):
      t0 = time.perf_counter()
      train_step(model, opt, tbatch, config.loss, fn)
      times.append(time.perf_counter() - t0)
    timing.step_s = float(np.median(times))  # the median, as benchmarks/train_step.py
    timing.examples_per_s = batch_size / timing.step_s
    return timing
  finally:
    torch.set_num_threads(previous_threads)


def benchmark(config, iters: int = 10, threads: int | None = None, batch_size: int | None = None,
              rtol: float = 1e-5) -> dict:
  """Eager and torch.compile timings of `config`'s train step on one synthetic batch
  (benchmarks/train_step.py's, of config.data.batch_size), from rvlm's initial params,
  each checked against rvlm's loss first (computed once here).

  Returns {batch, threads, rvlm_loss, loss_diff (the largest |torch - rvlm| of the two
  modes' first steps), eager: {...}, compile: {...}}, each mode a Timing as a dict;
  a mode that could not be timed (compile failure, or a loss off by more than `rtol`)
  has examples_per_s None and its `error`.
  """
  batch_size = batch_size or int(config.data.batch_size)
  threads = threads or os.cpu_count()
  batch = _synthetic_batch(config, batch_size)
  params = rvlm_init_params(config)
  expected = rvlm_loss(config, params, batch)
  out = dict(batch=batch_size, threads=threads, rvlm_loss=expected)
  diffs = []
  for mode, compiled in (("eager", False), ("compile", True)):
    t = time_train(config, batch_size, iters, compiled, threads, batch=batch, params=params,
                   expected_loss=expected, rtol=rtol, strict=False)
    row = dataclasses.asdict(t)
    if t.error is not None:
      row["examples_per_s"] = None
    if not math.isnan(t.loss):
      diffs.append(abs(t.loss - expected))
    out[mode] = row
  out["loss_diff"] = max(diffs) if diffs else float("nan")
  return out
