"""An independent plain-numpy (float64) reference of the rvlm forward pass.

Written from the math in /work/shared/method.md and the standard definitions of each
block (Llama-style decoder, SigLIP-style ViT), NOT by translating rvlm: there are no
einsums over fused head axes, no scans and no static-shape tricks here. Heads, layers,
examples and recursion steps are explicit Python loops, every activation is float64,
and fully-masked query rows are handled explicitly (their output is defined as zero;
callers compare real positions only, which never read them).

Parameters are read from the flax param tree (converted to float64 numpy with
`to_numpy`), so the only thing shared with rvlm is the param layout:
  decoder   q/k/v kernel [L, d, heads, head_dim], o kernel [L, heads, head_dim, d],
            gate/up [L, d, mlp], down [L, mlp, d], attn_norm/mlp_norm scale [L, d]
  vit       patch_embed [p*p*C, w] + bias, pos_embedding [n, w], blocks stacked on [depth]
  connector norm_scale [k, d], proj / proj_in / proj_out [k, modality, d, d], alpha [d] or [],
            fusion_logits [k]
  attention (decoder and ViT, only when the option is on) q_norm / k_norm scale
            [L, head_dim] (qk_norm), logit_scale [L, heads] (logit_scale='learned')

The options for importing Hugging Face checkpoints, from their definitions (the params
only exist when the option is on):
  qkv_bias   q_h = x W_q,h + b_q,h (likewise k and v with their kv head's bias), before
             QK-norm and RoPE (Qwen2); params q/k/v bias [L, heads or kv_heads, head_dim]
  out_bias   attention output sum_h o_h W_o,h + b_o; param o bias [L, d]
  mlp_bias   (silu(x W_g + b_g) * (x W_u + b_u)) W_d + b_d; gate/up bias [L, mlp], down [L, d]
  vit eps    the eps of every ViT LayerNorm and of the ViT QK-norm
  final_norm False: the ViT's output is the last block's output, no LayerNorm after it
  gelu       exact GELU x * Phi(x) = x (1 + erf(x / sqrt 2)) / 2 in the 'mlp' projector
  causal     query i sees key j iff j <= i and both are real tokens, over the whole
             sequence (image tokens and prompt included), whatever the batch's mask_ar

The attention-plateau options, from their definitions: qk_norm replaces each head's
query q_h and key k_h by rms_norm(q_h, q_norm) and rms_norm(k_h, k_norm) over head_dim
(before RoPE in the decoder, after the projection biases in the ViT); a learned logit
scale c_h multiplies head h's scores: softmax(c_h * q_h k_h^T / sqrt(D)).
"""
import math

import numpy as np


def to_numpy(tree):
  """A nested dict of arrays (a flax param tree, unboxed) -> float64 numpy arrays."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float64)


# ----------------------------------------------------------------------------------------
# Elementary functions.
# ----------------------------------------------------------------------------------------

def rms_norm(x, scale, eps):
  """x / sqrt(mean(x^2) + eps) * scale over the last axis."""
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def layer_norm(x, scale, bias, eps=1e-6):
  """(x - mean) / sqrt(var + eps) * scale + bias; eps = flax's LayerNorm default."""
  mu = np.mean(x, axis=-1, keepdims=True)
  var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def gelu_erf(x):
  """Exact GELU: x * Phi(x), Phi the standard normal CDF."""
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def gelu_tanh(x):
  """The tanh approximation of GELU (as in GPT-2 / SigLIP)."""
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
  return x / (1.0 + np.exp(-x))


def softmax(x):
  z = x - np.max(x, axis=-1, keepdims=True)
  e = np.exp(z)
  return e / np.sum(e, axis=-1, keepdims=True)


def rope(x, positions, theta):
  """Rotate-half rotary embedding of one head, x: [N, D], positions: [N].

  Frequency i (i = 0..D/2-1) is theta^(-2i/D); dimension i pairs with i + D/2
  (the Llama / HF convention, not the interleaved GPT-J one).
  """
  n, dim = x.shape
  half = dim // 2
  out = np.empty_like(x)
  for i in range(half):
    freq = theta ** (-2.0 * i / dim)
    ang = positions * freq
    c, s = np.cos(ang), np.sin(ang)
    out[:, i] = x[:, i] * c - x[:, i + half] * s
    out[:, i + half] = x[:, i + half] * c + x[:, i] * s
  return out


# ----------------------------------------------------------------------------------------
# Masks and positions (one example at a time).
# ----------------------------------------------------------------------------------------

def prefix_lm_mask(input_mask, mask_ar):
  """[N, N] bool: query i sees key j iff cum[j] <= cum[i] and both are real tokens.

  cum = cumsum(mask_ar): a run of mask_ar = 0 tokens shares one cum value, so they see
  each other (full-attention prefix); each mask_ar = 1 token opens a new value (causal).
  """
  n = len(input_mask)
  cum = np.cumsum(mask_ar)
  m = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(n):
      m[i, j] = cum[j] <= cum[i] and bool(input_mask[i]) and bool(input_mask[j])
  return m


def causal_mask(input_mask):
  """[N, N] bool: query i sees key j iff j <= i and both are real tokens."""
  n = len(input_mask)
  m = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(i + 1):
      m[i, j] = bool(input_mask[i]) and bool(input_mask[j])
  return m


def rope_positions(input_mask):
  """Index of each token among the real tokens (padding does not advance), clipped at 0."""
  return np.maximum(np.cumsum(input_mask) - 1, 0).astype(np.float64)


# ----------------------------------------------------------------------------------------
# Decoder.
# ----------------------------------------------------------------------------------------

def masked_attention_head(q, k, v, mask, logit_scale=1.0):
  """One head: softmax(c q k^T / sqrt(D)) v over the visible keys; rows with none -> 0.

  c = logit_scale (1 unless the head has a learned scale)."""
  scores = logit_scale * (q @ k.T) / math.sqrt(q.shape[-1])
  out = np.zeros((q.shape[0], v.shape[1]))
  for i in range(q.shape[0]):
    vis = mask[i]
    if vis.any():
      p = softmax(scores[i, vis])
      out[i] = p @ v[vis]
  return out


def head_logit_scale(p, h, logit_scale):
  """Head h's logit multiplier: the learned param, or 1 for logit_scale='none'."""
  if logit_scale == "none":
    return 1.0
  assert logit_scale == "learned", logit_scale
  return p["logit_scale"][h]


def gqa_attention(x, mask, positions, p, theta, eps=1e-6, qk_norm=False, logit_scale="none",
                  qkv_bias=False, out_bias=False):
  """Grouped-query attention of one example, x: [N, d]; p: one layer's attn params.

  Query head h reads kv head h // (H / K). With qkv_bias, each head's projection adds
  its bias. With qk_norm, each head's q and k are RMS-normalised over head_dim (eps =
  the decoder's norm_eps) before RoPE. With out_bias, the output adds the o bias once.
  """
  wq, wk, wv, wo = p["q"]["kernel"], p["k"]["kernel"], p["v"]["kernel"], p["o"]["kernel"]
  num_heads, num_kv = wq.shape[1], wk.shape[1]
  group = num_heads // num_kv
  out = np.zeros((x.shape[0], wo.shape[-1]))
  for h in range(num_heads):
    g = h // group
    q, k, v = x @ wq[:, h, :], x @ wk[:, g, :], x @ wv[:, g, :]
    if qkv_bias:
      q, k, v = q + p["q"]["bias"][h], k + p["k"]["bias"][g], v + p["v"]["bias"][g]
    if qk_norm:
      q, k = rms_norm(q, p["q_norm"]["scale"], eps), rms_norm(k, p["k_norm"]["scale"], eps)
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    out += masked_attention_head(q, k, v, mask, head_logit_scale(p, h, logit_scale)) @ wo[h]
  if out_bias:
    out = out + p["o"]["bias"]
  return out


def swiglu(x, p, bias=False):
  """(silu(x W_gate) * (x W_up)) W_down, each projection + its bias when `bias`."""
  def lin(h, name):
    y = h @ p[name]["kernel"]
    return y + p[name]["bias"] if bias else y
  return lin(silu(lin(x, "gate")) * lin(x, "up"), "down")


def layer_params(stacked, l):
  """Slice layer l out of a tree whose leaves carry a leading layer axis."""
  if isinstance(stacked, dict):
    return {k: layer_params(v, l) for k, v in stacked.items()}
  return stacked[l]


def decoder_layer(x, mask, positions, p, theta, eps, qk_norm=False, logit_scale="none",
                  qkv_bias=False, out_bias=False, mlp_bias=False):
  """Pre-norm block: x + Attn(RMSNorm(x)); then x + SwiGLU(RMSNorm(x))."""
  x = x + gqa_attention(rms_norm(x, p["attn_norm"]["scale"], eps), mask, positions, p["attn"],
                        theta, eps, qk_norm, logit_scale, qkv_bias, out_bias)
  return x + swiglu(rms_norm(x, p["mlp_norm"]["scale"], eps), p["mlp"], mlp_bias)


def decoder_stack(x, mask, positions, stacked, theta, eps, qk_norm=False, logit_scale="none",
                  qkv_bias=False, out_bias=False, mlp_bias=False):
  """All L layers on one example; returns the list of every layer's output (1..L)."""
  depth = stacked["attn_norm"]["scale"].shape[0]
  outs = []
  for l in range(depth):
    x = decoder_layer(x, mask, positions, layer_params(stacked, l), theta, eps, qk_norm,
                      logit_scale, qkv_bias, out_bias, mlp_bias)
    outs.append(x)
  return outs


# ----------------------------------------------------------------------------------------
# Image encoder and projector.
# ----------------------------------------------------------------------------------------

def patchify(image, patch):
  """[H, W, C] -> [(H/p)(W/p), p*p*C]: patches row-major over the grid, each flattened
  in (row, column, channel) order."""
  h, w, _ = image.shape
  rows = []
  for gy in range(h // patch):
    for gx in range(w // patch):
      rows.append(image[gy * patch:(gy + 1) * patch, gx * patch:(gx + 1) * patch, :].reshape(-1))
  return np.stack(rows)


def vit(image, p, patch, qk_norm=False, logit_scale="none", eps=1e-6, final_norm=True):
  """One image [H, W, C] -> tokens [n, w] (pre-LayerNorm blocks, final LayerNorm unless
  final_norm is False). `eps` is every LayerNorm's; with qk_norm, each head's (biased) q
  and k are RMS-normalised over head_dim with the same eps.
  """
  x = patchify(image, patch) @ p["patch_embed"]["kernel"] + p["patch_embed"]["bias"]
  x = x + p["pos_embedding"]
  blocks = p["blocks"]
  depth = blocks["ln1"]["scale"].shape[0]
  full = np.ones((x.shape[0], x.shape[0]), bool)
  for l in range(depth):
    b = layer_params(blocks, l)
    a = b["attn"]
    h = layer_norm(x, b["ln1"]["scale"], b["ln1"]["bias"], eps)
    attn = np.zeros_like(x)
    for head in range(a["q"]["kernel"].shape[1]):
      q = h @ a["q"]["kernel"][:, head] + a["q"]["bias"][head]
      k = h @ a["k"]["kernel"][:, head] + a["k"]["bias"][head]
      v = h @ a["v"]["kernel"][:, head] + a["v"]["bias"][head]
      if qk_norm:
        q, k = rms_norm(q, a["q_norm"]["scale"], eps), rms_norm(k, a["k_norm"]["scale"], eps)
      attn += (masked_attention_head(q, k, v, full, head_logit_scale(a, head, logit_scale))
               @ a["o"]["kernel"][head])
    x = x + attn + a["o"]["bias"]
    h = layer_norm(x, b["ln2"]["scale"], b["ln2"]["bias"], eps)
    m = b["mlp"]
    x = x + gelu_tanh(h @ m["fc1"]["kernel"] + m["fc1"]["bias"]) @ m["fc2"]["kernel"] + m["fc2"]["bias"]
  if not final_norm:
    assert "ln_final" not in p, "final_norm=False must create no ln_final params"
    return x
  return layer_norm(x, p["ln_final"]["scale"], p["ln_final"]["bias"], eps)


def projector(x, p, kind, act="gelu_tanh"):
  """linear: x W + b; mlp: act(x W1 + b1) W2 + b2, act = gelu_tanh or exact gelu."""
  if kind == "linear":
    return x @ p["linear"]["kernel"] + p["linear"]["bias"]
  gelu = {"gelu_tanh": gelu_tanh, "gelu": gelu_erf}[act]
  m = p["mlp"]
  return gelu(x @ m["fc1"]["kernel"] + m["fc1"]["bias"]) @ m["fc2"]["kernel"] + m["fc2"]["bias"]


# ----------------------------------------------------------------------------------------
# Recursive Connector and the full VLM.
# ----------------------------------------------------------------------------------------

def sampled_layers(depth, k):
  """1-indexed S = {ceil(i * L / k) : i = 1..k}, computed in exact integer arithmetic."""
  return [-(-i * depth // k) for i in range(1, k + 1)]


def connector(layer_outs, e0, e_prev, p, con, num_image_tokens, eps):
  """E_(r+1) for one example from the step-r layer outputs (list over layers 1..L).

  Position t uses modality weights 0 (image) if t < num_image_tokens else 1 (text),
  or weights 0 everywhere when modality_specific is False.
  """
  depth = len(layer_outs)
  chosen = sampled_layers(depth, con["num_layers"])
  n = e0.shape[0]
  projected = []
  for s, layer in enumerate(chosen):
    normed = rms_norm(layer_outs[layer - 1], p["norm_scale"][s], eps)
    out = np.zeros_like(normed)
    for t in range(n):
      m = 0 if (not con["modality_specific"] or t < num_image_tokens) else 1
      if con["projection"] == "linear":
        out[t] = normed[t] @ p["proj"][s, m]
      else:
        out[t] = gelu_tanh(normed[t] @ p["proj_in"][s, m]) @ p["proj_out"][s, m]
    projected.append(out)
  if con["fusion"] == "mean":
    fused = sum(projected) / len(projected)
  else:
    w = softmax(p["fusion_logits"])
    fused = sum(w[s] * projected[s] for s in range(len(projected)))
  update = p["alpha"] * fused
  if con["base"] == "embed":
    return e0 + update
  if con["base"] == "prev":
    return e_prev + update
  return update


def vlm_forward(params, batch, cfg, num_steps=None):
  """The full forward pass of one batch in float64.

  params: `to_numpy(unboxed flax params)`; batch: dict of numpy arrays; cfg: the
  `config.model` ConfigDict. Returns dict(
    hidden [R, B, T, d]: final-layer output of each step on the text positions,
    logits [R, B, T, V]: final RMSNorm + LM head of every step,
    step_inputs [R, B, N, d]: the input of each step,
    input_mask [B, N]).
  """
  dec, con, rec = cfg.decoder, cfg.connector, cfg.recursion
  steps = rec.num_steps if num_steps is None else num_steps
  eps, theta = dec.norm_eps, dec.rope_theta
  stacked = params["recursion"]["step"]["stack"]["layers"]["layer"]
  nv = (cfg.vit.image_size // cfg.vit.patch_size) ** 2
  images, tokens = batch["image"], batch["tokens"]
  bsz, t_len = tokens.shape
  image_mask = batch.get("image_mask", np.ones((bsz,), np.int32))
  hidden, logits, inputs, masks = [], [], [], []
  for b in range(bsz):
    # E_0 = concat(V, T); an image-less example gets zero image tokens that are also
    # masked out of attention.
    feats = vit(images[b].astype(np.float64), params["vit"], cfg.vit.patch_size,
                cfg.vit.qk_norm, cfg.vit.logit_scale, cfg.vit.norm_eps, cfg.vit.final_norm)
    img = projector(feats, params["projector"], cfg.projector.kind,
                    cfg.projector.act) * float(image_mask[b])
    txt = params["embed"]["embedding"][tokens[b]]
    e0 = np.concatenate([img, txt], axis=0)
    input_mask = np.concatenate([np.full((nv,), int(image_mask[b])), batch["input_mask"][b]])
    if cfg.attention == "causal":
      mask = causal_mask(input_mask)
    else:  # prefix: the image block and the batch's prefix see each other
      assert cfg.attention == "prefix", cfg.attention
      mask_ar = np.concatenate([np.zeros((nv,), int), batch["mask_ar"][b]])
      mask = prefix_lm_mask(input_mask, mask_ar)
    pos = rope_positions(input_mask)
    e, hs, es = e0, [], []
    for _ in range(steps):
      outs = decoder_stack(e, mask, pos, stacked, theta, eps, dec.qk_norm, dec.logit_scale,
                           dec.qkv_bias, dec.out_bias, dec.mlp_bias)
      hs.append(outs[-1])
      es.append(e)
      if rec.mode == "connector":
        e = connector(outs, e0, e, params["recursion"]["step"]["connector"], con, nv, eps)
      else:  # vanilla: E_(r+1) = H_L^(r), before the final norm.
        e = outs[-1]
    h = np.stack(hs)[:, nv:]
    normed = rms_norm(h, params["final_norm"]["scale"], eps)
    if cfg.tie_embeddings:
      lg = normed @ params["embed"]["embedding"].T
    else:
      lg = normed @ params["lm_head"]["kernel"]
    hidden.append(h)
    logits.append(lg)
    inputs.append(np.stack(es))
    masks.append(input_mask)
  return dict(hidden=np.stack(hidden, 1), logits=np.stack(logits, 1),
              step_inputs=np.stack(inputs, 1), input_mask=np.stack(masks))
