"""An rvlm workdir -> a Hugging Face directory transformers loads.

Two layouts, chosen by where the model came from (config.model.hf.layout):
  llava      one LlavaForConditionalGeneration directory (models imported from LLaVA)
  causal_lm  the decoder as a LlamaForCausalLM / Qwen2ForCausalLM directory, the vision
             tower as a SiglipVisionModel in `vision_tower/` (everything else, including
             models trained from scratch)
Beside them: rvlm_config.json (the rvlm config.model) and rvlm_extra.safetensors
(params HF has no place for, keyed by rvlm path: the Recursive Connector; the projector
in the causal_lm layout), and the tokenizer files when the model has a tokenizer.json.
rvlm.convert import reads all of it back.
"""
import json
import os
import shutil
import tempfile

import numpy as np
from absl import logging
from flax import traverse_util

from rvlm.convert import hf_config
from rvlm.convert import keymap
from rvlm.convert.importer import (RVLM_CONFIG, RVLM_EXTRA, TOKENIZER_FILES, VISION_SUBDIR,
                                   _fresh_out)
from rvlm.convert.safetensors_io import ConversionError, write_safetensors


def _json(path, obj):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)


def _original(m, field):
  text = (m.get("hf") or {}).get(field) or ""
  return json.loads(text) if text else None


def layout_of(m):
  """'llava' when the model came from a LLaVA checkpoint and still fits one."""
  hf = m.get("hf") or {}
  if hf.get("layout") == "llava" and not m.vit.get("final_norm", True):
    return "llava"
  return "causal_lm"


def hf_tensors(m, params):
  """{directory ('' or 'vision_tower'): {HF key: array}}, {rvlm path: array} extras."""
  flat = {p: np.asarray(v, np.float32)
          for p, v in traverse_util.flatten_dict(dict(params), sep="/").items()}
  layout, tied = layout_of(m), bool(m.tie_embeddings)
  patch = int(m.vit.patch_size)
  w = lambda part: keymap.written_prefix(layout, part)  # noqa: E731
  if layout == "llava":
    rules = (keymap.decoder_rules(m, w("text"), w("lm_head"), tied)
             + keymap.vision_rules(m, w("vision"))
             + keymap.projector_rules(w("projector")))
    files = {"": keymap.export_tensors(rules, flat, patch)}
    # LLaVA never runs the tower's post-norm (it reads a layer's output), but the HF
    # module has one: written as the identity LayerNorm so the directory is complete.
    width = int(m.vit.width)
    files[""][w("vision") + "post_layernorm.weight"] = np.ones(width, np.float32)
    files[""][w("vision") + "post_layernorm.bias"] = np.zeros(width, np.float32)
  else:
    if not m.vit.get("final_norm", True):
      raise ConversionError("config.model.vit.final_norm=False: a SiglipVisionModel's "
                            "output has its post-norm; only the LLaVA layout can leave it out")
    text = keymap.decoder_rules(m, keymap.written_prefix("causal_lm", "text"),
                                keymap.written_prefix("causal_lm", "lm_head"), tied)
    vision = keymap.vision_rules(m, keymap.written_prefix("vision", "vision"))
    files = {"": keymap.export_tensors(text, flat, patch),
             VISION_SUBDIR: keymap.export_tensors(vision, flat, patch)}
    rules = text + vision
  taken = {r.path for r in rules}
  extra = {p: v for p, v in flat.items() if p not in taken}
  return files, extra


def hf_configs(m):
  """{directory: config.json dict} of the export."""
  if layout_of(m) == "llava":
    return {"": hf_config.hf_llava_config(m, _original(m, "config_json"))}
  original = _original(m, "config_json") if (m.get("hf") or {}).get("layout") == "causal_lm" else None
  return {"": hf_config.hf_text_config(m, original),
          VISION_SUBDIR: hf_config.hf_vision_config(m, _original(m, "vision_config_json"))}


def export(config, params, out):
  """Writes the HF directory `out` (refused if it exists and is not empty)."""
  m = config.model
  if m.get("attention", "prefix") != "causal":
    logging.warning("config.model.attention=%r: this model attends bidirectionally over "
                    "image and prompt; Hugging Face Llama / Qwen2 / LLaVA attend causally, "
                    "so their outputs will differ from rvlm's", m.get("attention", "prefix"))
  configs = hf_configs(m)          # refuses what HF cannot express, before writing
  files, extra = hf_tensors(m, params)
  out = _fresh_out(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
  try:
    for sub, cfg in configs.items():
      os.makedirs(os.path.join(tmp, sub), exist_ok=True)
      _json(os.path.join(tmp, sub, "config.json"), dict(cfg, dtype="float32"))
      write_safetensors(os.path.join(tmp, sub), files[sub])
    model_json = json.loads(m.to_json_best_effort())
    _json(os.path.join(tmp, RVLM_CONFIG), model_json)
    if extra:
      write_safetensors(tmp, extra, filename=RVLM_EXTRA, metadata={"format": "rvlm"})
    tok = config.data.tokenizer
    if tok.get("kind") == "hf" and tok.get("path"):
      src_dir = os.path.dirname(tok.path)
      for name in TOKENIZER_FILES:
        src = (tok.path if name == "tokenizer.json" else os.path.join(src_dir, name))
        if os.path.exists(src):
          shutil.copy(src, os.path.join(tmp, name))
    else:
      logging.warning("config.data.tokenizer.kind=%r has no tokenizer.json; the export has "
                      "no tokenizer", tok.get("kind"))
    if os.path.isdir(out):
      os.rmdir(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
