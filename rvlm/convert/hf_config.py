"""Hugging Face config.json <-> rvlm `config.model`.

Supported (anything else is refused with the field that makes it unsupported):
  decoders  LlamaForCausalLM, Qwen2ForCausalLM: grouped- and multi-query attention,
            RoPE theta (default rope type), RMSNorm eps, tied or untied embeddings,
            Qwen2's q/k/v biases, Llama's attention_bias / mlp_bias, SiLU MLP
  vision    SiglipVisionModel (or the vision half of SiglipModel)
  VLM       LlavaForConditionalGeneration with a SigLIP tower, a Llama or Qwen2 text
            model, one vision_feature_layer and the 'full' feature strategy

The converted config is a standard transformer (recursion mode 'none') with causal
attention over image and text, as HF runs it; rvlm.convert.recursify makes it recursive.
The original config.json is kept in `config.model.hf` so an export writes back what
rvlm does not model (token ids, max positions, ...).
"""
import copy
import json

import ml_collections

from rvlm.convert.safetensors_io import ConversionError
from rvlm.models import presets

DECODERS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
VISION = ("SiglipVisionModel", "SiglipModel")
LLAVA = "LlavaForConditionalGeneration"
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new")
_GELU = {"gelu": "gelu", **{a: "gelu_tanh" for a in _GELU_TANH}}


def architecture(config, where):
  """(layout, name): layout 'causal_lm' | 'llava' | 'vision'."""
  archs = config.get("architectures") or []
  name = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                 "llava": LLAVA, "siglip_vision_model": "SiglipVisionModel",
                                 "siglip": "SiglipModel"}.get(config.get("model_type"), "")
  if name in DECODERS:
    return "causal_lm", name
  if name == LLAVA:
    return "llava", name
  if name in VISION:
    return "vision", name
  supported = sorted(DECODERS) + [LLAVA] + list(VISION)
  raise ConversionError(f"{where}: architectures={archs or None} (model_type="
                        f"{config.get('model_type')!r}) is not supported; rvlm converts "
                        f"{', '.join(supported)}")


def _get(c, key, where, default=None):
  value = c.get(key, default)
  if value is None:
    raise ConversionError(f"{where}: the config has no {key!r}")
  return value


def rope_theta(tc, where):
  """RoPE theta of a text config (transformers 5 rope_parameters or the older keys)."""
  params = tc.get("rope_parameters") or {}
  scaling = tc.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    field = "rope_parameters.rope_type" if params else "rope_scaling"
    raise ConversionError(f"{where}: {field}={kind!r} is not supported (rvlm's RoPE is the "
                          "default, unscaled one)")
  return float(params.get("rope_theta", tc.get("rope_theta", 10_000.0)))


def decoder_fields(tc, family, where):
  """config.model.decoder fields (+ vocab_size) from a Llama / Qwen2 text config."""
  if tc.get("hidden_act", "silu") != "silu":
    raise ConversionError(f"{where}: hidden_act={tc['hidden_act']!r} is not supported "
                          "(rvlm's decoder MLP is SwiGLU with SiLU)")
  if family == "qwen2":
    if tc.get("use_sliding_window"):
      raise ConversionError(f"{where}: use_sliding_window=True is not supported (rvlm "
                            "attends over the whole sequence)")
    if any(t != "full_attention" for t in tc.get("layer_types") or []):
      raise ConversionError(f"{where}: layer_types={tc['layer_types']} is not supported "
                            "(only 'full_attention')")
    qkv_bias, out_bias, mlp_bias = True, False, False
  else:
    qkv_bias = out_bias = bool(tc.get("attention_bias", False))
    mlp_bias = bool(tc.get("mlp_bias", False))
  width = int(_get(tc, "hidden_size", where))
  heads = int(_get(tc, "num_attention_heads", where))
  if tc.get("head_dim") is None and width % heads:
    raise ConversionError(f"{where}: hidden_size={width} is not divisible by "
                          f"num_attention_heads={heads} and there is no head_dim")
  return dict(
      vocab_size=int(_get(tc, "vocab_size", where)),
      decoder=dict(width=width, depth=int(_get(tc, "num_hidden_layers", where)),
                   num_heads=heads,
                   num_kv_heads=int(tc.get("num_key_value_heads") or heads),
                   head_dim=int(tc.get("head_dim") or width // heads),
                   mlp_dim=int(_get(tc, "intermediate_size", where)),
                   rope_theta=rope_theta(tc, where),
                   norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
                   qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias))


def vision_fields(vc, where, depth=None, final_norm=True):
  """config.model.vit fields from a SigLIP vision config; `depth` layers used."""
  if vc.get("hidden_act", "gelu_pytorch_tanh") not in _GELU_TANH:
    raise ConversionError(f"{where}: vision hidden_act={vc['hidden_act']!r} is not supported "
                          f"(rvlm's ViT MLP uses {_GELU_TANH[0]})")
  if int(vc.get("num_channels", 3)) != 3:
    raise ConversionError(f"{where}: num_channels={vc['num_channels']} is not supported "
                          "(rvlm's images are RGB)")
  total = int(_get(vc, "num_hidden_layers", where))
  return dict(image_size=int(_get(vc, "image_size", where)),
              patch_size=int(_get(vc, "patch_size", where)),
              width=int(_get(vc, "hidden_size", where)),
              depth=total if depth is None else depth,
              num_heads=int(_get(vc, "num_attention_heads", where)),
              mlp_dim=int(_get(vc, "intermediate_size", where)),
              norm_eps=float(vc.get("layer_norm_eps", 1e-6)), final_norm=final_norm)


def vision_config_of(config):
  """The vision config of a SiglipVisionModel / SiglipModel config.json."""
  return config.get("vision_config", config) if config.get("model_type") == "siglip" else config


def llava_vision_depth(config, where):
  """How many vision layers LLaVA reads: vision_feature_layer as a layer count."""
  layer = config.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ConversionError(f"{where}: vision_feature_layer={layer!r} is not supported (one "
                          "layer, not a list to concatenate)")
  strategy = config.get("vision_feature_select_strategy", "default")
  if strategy != "full":
    raise ConversionError(f"{where}: vision_feature_select_strategy={strategy!r} is not "
                          "supported: 'default' drops the first token, a CLS token in CLIP; "
                          "a SigLIP tower has none (use 'full')")
  total = int(_get(config.get("vision_config") or {}, "num_hidden_layers", where))
  used = layer if layer >= 0 else total + 1 + layer
  if not 0 <= used <= total:
    raise ConversionError(f"{where}: vision_feature_layer={layer} is outside the "
                          f"{total}-layer vision tower")
  return used


def projector_act(config, where):
  act = config.get("projector_hidden_act", "gelu")
  if act not in _GELU:
    raise ConversionError(f"{where}: projector_hidden_act={act!r} is not supported "
                          f"(choose one of {sorted(_GELU)})")
  if not config.get("multimodal_projector_bias", True):
    raise ConversionError(f"{where}: multimodal_projector_bias=False is not supported")
  return _GELU[act]


def model_config(*, decoder, vit, projector_act_name, tied, provenance):
  """A full config.model: a standard (mode 'none') causal transformer."""
  m = presets.small()
  m.update(dict(vocab_size=decoder["vocab_size"], tie_embeddings=bool(tied), attention="causal"))
  m.decoder.update(decoder["decoder"])
  m.vit.update(vit)
  m.projector.update(dict(kind="mlp", act=projector_act_name))
  m.recursion.update(dict(mode="none", num_steps=1))
  # k = 4 sampled layers (L/4, L/2, 3L/4, L), or every layer of a shallower decoder.
  m.connector.num_layers = min(int(m.connector.num_layers), int(m.decoder.depth))
  m.hf = ml_collections.ConfigDict(provenance)
  return m


# ---- export: rvlm config.model -> HF config.json ----------------------------------------

def _unsupported_for_export(m):
  for part in ("decoder", "vit"):
    if m[part].qk_norm or m[part].logit_scale != "none":
      raise ConversionError(f"config.model.{part}: qk_norm / logit_scale have no Hugging "
                            "Face Llama / Qwen2 / SigLIP counterpart; cannot export")
  if m.projector.kind != "mlp":
    raise ConversionError(f"config.model.projector.kind={m.projector.kind!r}: the LLaVA "
                          "projector is a 2-layer MLP; cannot export a linear projector")


def text_family(m):
  hf = m.get("hf") or {}
  if hf.get("text_family"):
    return hf["text_family"]
  d = m.decoder
  return "qwen2" if d.qkv_bias and not d.out_bias and not d.mlp_bias else "llama"


def hf_text_config(m, original=None):
  _unsupported_for_export(m)
  d, family = m.decoder, text_family(m)
  if family == "qwen2" and (not d.qkv_bias or d.out_bias or d.mlp_bias):
    raise ConversionError("config.model.decoder: Qwen2 has q/k/v biases only; this model has "
                          f"qkv_bias={d.qkv_bias} out_bias={d.out_bias} mlp_bias={d.mlp_bias}")
  if family == "llama" and d.qkv_bias != d.out_bias:
    raise ConversionError("config.model.decoder: Llama's attention_bias covers q/k/v/o "
                          f"together; qkv_bias={d.qkv_bias} out_bias={d.out_bias} differ")
  tc = copy.deepcopy(original or {})
  for legacy in ("rope_theta", "rope_scaling"):
    tc.pop(legacy, None)
  tc.update(model_type=family, architectures=[{"llama": "LlamaForCausalLM",
                                                "qwen2": "Qwen2ForCausalLM"}[family]],
            vocab_size=int(m.vocab_size), hidden_size=int(d.width),
            intermediate_size=int(d.mlp_dim), num_hidden_layers=int(d.depth),
            num_attention_heads=int(d.num_heads), num_key_value_heads=int(d.num_kv_heads),
            head_dim=int(d.head_dim), rms_norm_eps=float(d.norm_eps), hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": float(d.rope_theta)},
            tie_word_embeddings=bool(m.tie_embeddings))
  if family == "llama":
    tc.update(attention_bias=bool(d.qkv_bias), mlp_bias=bool(d.mlp_bias))
  else:
    tc.update(use_sliding_window=False, layer_types=["full_attention"] * int(d.depth))
  return tc


def hf_vision_config(m, original=None):
  v = m.vit
  vc = copy.deepcopy(original or {})
  vc.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
            hidden_size=int(v.width), intermediate_size=int(v.mlp_dim),
            num_hidden_layers=int(v.depth), num_attention_heads=int(v.num_heads),
            image_size=int(v.image_size), patch_size=int(v.patch_size), num_channels=3,
            layer_norm_eps=float(v.norm_eps), hidden_act="gelu_pytorch_tanh",
            vision_use_head=False)  # rvlm keeps no pooling head
  return vc


def hf_llava_config(m, original):
  """LLaVA config.json; needs the original LLaVA config (its image token id)."""
  _unsupported_for_export(m)
  c = copy.deepcopy(original)
  c["text_config"] = hf_text_config(m, c.get("text_config"))
  c["text_config"].pop("architectures", None)
  c["vision_config"] = hf_vision_config(m, c.get("vision_config"))
  c.update(architectures=[LLAVA], model_type="llava", vision_feature_layer=-1,
           vision_feature_select_strategy="full", multimodal_projector_bias=True,
           projector_hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[
               m.projector.act],
           tie_word_embeddings=bool(m.tie_embeddings))
  return c


def provenance(layout, config, text_family_name=None, vision_config=None):
  return dict(layout=layout, text_family=text_family_name or "",
              config_json=json.dumps(config, sort_keys=True),
              vision_config_json=json.dumps(vision_config, sort_keys=True)
              if vision_config is not None else "")
