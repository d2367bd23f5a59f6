"""Which Hugging Face tensor is which rvlm param, and how its layout changes.

A rule maps one rvlm param path to one HF key (with `{i}` for a per-layer key: the L
tensors are stacked on rvlm's leading scanned 'layers' axis, as maxtext does). Layouts:
  copy    same array (norm scales, biases of matching shape, embeddings)
  linear  torch Linear weight [out, in] <-> rvlm kernel [in..., out...]: the first
          `num_in` kernel dims are the input (2 for an attention output: heads, head_dim)
  bias    flat [out] <-> rvlm's [heads, head_dim] (or any shape of the same size)
  conv    Conv2d patch weight [D, C, p, p] <-> rvlm's patch_embed [p*p*C, D] (rvlm
          flattens a patch row-major over (row, column, channel))

The same rules run both ways (import and export), so a key can never be read one way
and written another. HF key prefixes differ between transformers versions and saving
paths (`language_model.model.` vs `model.language_model.`, a SigLIP tower with or
without `vision_model.`); reading tries each known prefix, writing uses the one
transformers 5 writes itself.
"""
import dataclasses
import math
import re

import numpy as np

from rvlm.convert.safetensors_io import ConversionError

STACK = "recursion/step/stack/layers/layer/"


@dataclasses.dataclass(frozen=True)
class Rule:
  path: str          # rvlm param path, '/'-separated
  key: str           # HF key; '{i}' for per-layer tensors
  layout: str        # copy | linear | bias | conv
  num_in: int = 1    # linear: kernel dims that are the input
  layers: int = 0    # per-layer rules: how many layers


def _to_rvlm(rule, x, shape):
  if rule.layout == "linear":
    return x.T.reshape(shape)
  if rule.layout == "conv":
    d, c, p, q = x.shape
    return x.transpose(2, 3, 1, 0).reshape(p * q * c, d)
  return x.reshape(shape)  # copy / bias


def _to_hf(rule, x, patch=None):
  if rule.layout == "linear":
    return x.reshape(math.prod(x.shape[:rule.num_in]), -1).T
  if rule.layout == "conv":
    c = x.shape[0] // (patch * patch)
    return x.reshape(patch, patch, c, x.shape[1]).transpose(3, 2, 0, 1)
  if rule.layout == "bias":
    return x.reshape(-1)
  return x


# ---- rules of each part ----------------------------------------------------------------

def decoder_rules(m, model_prefix, lm_head_key, tied):
  d, n = m.decoder, int(m.decoder.depth)
  layer = model_prefix + "layers.{i}."
  rules = [Rule("embed/embedding", model_prefix + "embed_tokens.weight", "copy"),
           Rule("final_norm/scale", model_prefix + "norm.weight", "copy")]
  if not tied:
    rules.append(Rule("lm_head/kernel", lm_head_key, "linear"))
  per_layer = [("attn_norm/scale", "input_layernorm.weight", "copy", 1),
               ("mlp_norm/scale", "post_attention_layernorm.weight", "copy", 1)]
  for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
    per_layer.append((f"attn/{ours}/kernel", f"self_attn.{theirs}.weight", "linear", 1))
    if d.get("qkv_bias", False):
      per_layer.append((f"attn/{ours}/bias", f"self_attn.{theirs}.bias", "bias", 1))
  per_layer.append(("attn/o/kernel", "self_attn.o_proj.weight", "linear", 2))
  if d.get("out_bias", False):
    per_layer.append(("attn/o/bias", "self_attn.o_proj.bias", "bias", 1))
  for ours in ("gate", "up", "down"):
    per_layer.append((f"mlp/{ours}/kernel", f"mlp.{ours}_proj.weight", "linear", 1))
    if d.get("mlp_bias", False):
      per_layer.append((f"mlp/{ours}/bias", f"mlp.{ours}_proj.bias", "bias", 1))
  rules += [Rule(STACK + p, layer + k, lay, num_in, n) for p, k, lay, num_in in per_layer]
  return rules


def vision_rules(m, prefix):
  v, n = m.vit, int(m.vit.depth)
  rules = [Rule("vit/patch_embed/kernel", prefix + "embeddings.patch_embedding.weight", "conv"),
           Rule("vit/patch_embed/bias", prefix + "embeddings.patch_embedding.bias", "copy"),
           Rule("vit/pos_embedding", prefix + "embeddings.position_embedding.weight", "copy")]
  if v.get("final_norm", True):
    rules += [Rule("vit/ln_final/scale", prefix + "post_layernorm.weight", "copy"),
              Rule("vit/ln_final/bias", prefix + "post_layernorm.bias", "copy")]
  layer = prefix + "encoder.layers.{i}."
  per_layer = [("ln1/scale", "layer_norm1.weight", "copy", 1),
               ("ln1/bias", "layer_norm1.bias", "copy", 1),
               ("ln2/scale", "layer_norm2.weight", "copy", 1),
               ("ln2/bias", "layer_norm2.bias", "copy", 1),
               ("mlp/fc1/kernel", "mlp.fc1.weight", "linear", 1),
               ("mlp/fc1/bias", "mlp.fc1.bias", "copy", 1),
               ("mlp/fc2/kernel", "mlp.fc2.weight", "linear", 1),
               ("mlp/fc2/bias", "mlp.fc2.bias", "copy", 1),
               ("attn/o/kernel", "self_attn.out_proj.weight", "linear", 2),
               ("attn/o/bias", "self_attn.out_proj.bias", "copy", 1)]
  for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
    per_layer += [(f"attn/{ours}/kernel", f"self_attn.{theirs}.weight", "linear", 1),
                  (f"attn/{ours}/bias", f"self_attn.{theirs}.bias", "bias", 1)]
  if n:
    rules += [Rule("vit/blocks/" + p, layer + k, lay, num_in, n)
              for p, k, lay, num_in in per_layer]
  return rules


def projector_rules(prefix):
  return [Rule("projector/mlp/fc1/kernel", prefix + "linear_1.weight", "linear"),
          Rule("projector/mlp/fc1/bias", prefix + "linear_1.bias", "copy"),
          Rule("projector/mlp/fc2/kernel", prefix + "linear_2.weight", "linear"),
          Rule("projector/mlp/fc2/bias", prefix + "linear_2.bias", "copy")]


# ---- prefixes ---------------------------------------------------------------------------

# (reading candidates, the one written) per part and layout.
PREFIXES = {
    ("causal_lm", "text"): (["model."], "model."),
    ("causal_lm", "lm_head"): (["lm_head.weight"], "lm_head.weight"),
    ("llava", "text"): (["language_model.model.", "model.language_model."],
                        "language_model.model."),
    ("llava", "lm_head"): (["language_model.lm_head.weight", "lm_head.weight"],
                           "language_model.lm_head.weight"),
    ("llava", "vision"): (["vision_tower.", "vision_tower.vision_model.",
                           "model.vision_tower.", "model.vision_tower.vision_model."],
                          "vision_tower."),
    ("llava", "projector"): (["multi_modal_projector.", "model.multi_modal_projector."],
                             "multi_modal_projector."),
    ("vision", "vision"): (["", "vision_model."], ""),
}
_MARKERS = {"text": "embed_tokens.weight", "vision": "embeddings.patch_embedding.weight",
            "projector": "linear_1.weight"}


def find_prefix(keys, layout, part, where):
  candidates, _ = PREFIXES[(layout, part)]
  for prefix in candidates:
    if part == "lm_head":
      if prefix in keys:
        return prefix
    elif prefix + _MARKERS[part] in keys:
      return prefix
  if part == "lm_head":
    return None  # tied embeddings
  raise ConversionError(f"{where}: no {part} weights: none of "
                        f"{', '.join(c + _MARKERS[part] for c in candidates)} is present")


def written_prefix(layout, part):
  return PREFIXES[(layout, part)][1]


# Tensors an HF checkpoint may hold that rvlm has no use for (dropped on import, named in
# the log): SigLIP's pooling head, and for LLaVA the post-norm and the vision layers past
# vision_feature_layer, which LLaVA never runs; rotary caches some checkpoints store.
def unused_patterns(layout, vision_prefix=None, vision_depth=None, final_norm=True):
  pats = [r".*rotary_emb\.inv_freq"]
  if vision_prefix is not None:
    vp = re.escape(vision_prefix)
    pats.append(vp + r"head\..*")
    if not final_norm:
      pats.append(vp + r"post_layernorm\..*")
    if vision_depth is not None:
      pats.append(vp + r"encoder\.layers\.(\d+)\..*")
  if layout == "vision_pair":   # a full SiglipModel read for its vision half
    pats += [r"text_model\..*", r"logit_scale", r"logit_bias"]
  return pats


def is_unused(key, patterns, vision_depth):
  for pat in patterns:
    match = re.fullmatch(pat, key)
    if match:
      if match.groups():  # a vision layer: unused only past the layers rvlm runs
        return int(match.group(1)) >= vision_depth
      return True
  return False


# ---- the two directions -----------------------------------------------------------------

def _aligned_empty(shape, dtype=np.float32, align=64):
  """np.empty whose data starts on an `align`-byte boundary (numpy only promises 16;
  XLA's CPU client copies a less aligned array once more to align it)."""
  dtype = np.dtype(dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  buf = np.empty(nbytes + align, np.uint8)
  start = -buf.ctypes.data % align
  return buf[start:start + nbytes].view(dtype).reshape(shape)


def import_tensors(rules, checkpoint, want_shapes):
  """{rvlm path: float32 array} from `checkpoint` (an HFCheckpoint) by `rules`.

  `want_shapes` {path: shape} are the shapes the rvlm model expects; a tensor that
  does not convert to its shape is an error naming both keys and shapes. Returns
  (params, the HF keys read).
  """
  out, used, missing = {}, set(), []
  for rule in rules:
    keys = ([rule.key.format(i=i) for i in range(rule.layers)] if rule.layers else [rule.key])
    absent = [k for k in keys if k not in checkpoint]
    if absent:
      missing += absent
      continue
    want = want_shapes[rule.path]
    one = want[1:] if rule.layers else want
    # Each layer is converted straight into its slot of one C-contiguous, 64-byte aligned
    # array: no list of per-layer copies plus np.stack (twice the param at once), and
    # jax takes it without an extra aligning copy of every param (`check`).
    value = _aligned_empty(want)
    for i, key in enumerate(keys):
      x = checkpoint.get(key)
      try:
        converted = _to_rvlm(rule, x, one)
      except ValueError:
        raise ConversionError(
            f"{checkpoint.dir}: {key} has shape {tuple(x.shape)}, which does not convert to "
            f"rvlm's {rule.path} {tuple(one)} (the config.json says otherwise)") from None
      if converted.shape != tuple(one):
        raise ConversionError(f"{checkpoint.dir}: {key} has shape {tuple(x.shape)}; rvlm's "
                              f"{rule.path} needs {tuple(one)}")
      if rule.layers:
        value[i] = converted
      else:
        value[...] = converted
      del x, converted
    out[rule.path] = value
    used.update(keys)
  if missing:
    raise ConversionError(f"{checkpoint.dir}: missing keys {_short(missing)}")
  return out, used


def export_tensors(rules, flat_params, patch=None):
  """{HF key: float32 array} from rvlm's flat params by `rules`."""
  out = {}
  for rule in rules:
    x = np.asarray(flat_params[rule.path], np.float32)
    if rule.layers:
      for i in range(rule.layers):
        out[rule.key.format(i=i)] = _to_hf(rule, x[i], patch)
    else:
      out[rule.key] = _to_hf(rule, x, patch)
  return out


def _short(keys, limit=10):
  keys = sorted(keys)
  return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")
