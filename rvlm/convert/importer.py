"""A Hugging Face directory -> rvlm config.model + params (+ its tokenizer).

  imported = load_hf(hf_dir, vision_dir=None)   # nothing written
  write_workdir(imported, out)                  # out/checkpoints/0 + out/tokenizer.json

What a directory may be:
  llava      LlavaForConditionalGeneration: vision tower, projector and decoder
  causal_lm  LlamaForCausalLM / Qwen2ForCausalLM; the vision tower comes from
             `vision_dir` (a SiglipVisionModel) or `hf_dir/vision_tower/` (rvlm's export
             layout), else the `small` preset's ViT is freshly initialised; the projector
             is fresh unless the directory is an rvlm export
An rvlm export (rvlm_config.json beside the HF files) restores rvlm's own settings and
the params HF has no place for (connector; projector of a causal_lm export) from
rvlm_extra.safetensors, so import -> export -> import is the identity.

Every HF tensor is accounted for: each is read into exactly one param, or is on the
named list of tensors rvlm does not use (SigLIP's pooling head; for LLaVA the vision
post-norm and the layers past vision_feature_layer). Anything else is an error naming
the keys, as is a missing key or a shape that the config.json does not predict.
"""
import dataclasses
import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn
from flax import traverse_util
from safetensors import safe_open

from rvlm.convert import hf_config
from rvlm.convert import keymap
from rvlm.convert.safetensors_io import ConversionError, HFCheckpoint, read_json
from rvlm.models import vlm

RVLM_CONFIG = "rvlm_config.json"       # config.model of an rvlm export
RVLM_EXTRA = "rvlm_extra.safetensors"  # params with no HF place, keyed by rvlm path
VISION_SUBDIR = "vision_tower"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class Imported:
  model: ml_collections.ConfigDict    # config.model
  params: dict                        # nested float32 numpy
  tokenizer: dict                     # config.data.tokenizer fields ({} if none found)
  hf_dir: str
  tokenizer_dir: str | None           # where tokenizer files were found
  notes: list                         # what was dropped / freshly initialised


def param_shapes(model_cfg):
  """{path: shape} of the params `model_cfg` builds (nothing computed)."""
  from rvlm import train  # pylint: disable=g-import-not-at-top  (heavy)
  cfg = ml_collections.ConfigDict(dict(model=model_cfg, data=dict(seq_len=2)))
  boxed = jax.eval_shape(vlm.make_model(model_cfg).init, jax.random.PRNGKey(0),
                         train.dummy_batch(cfg, 1))["params"]
  return {p: tuple(v.shape) for p, v in
          traverse_util.flatten_dict(nn.unbox(boxed), sep="/").items()}


def fresh_params(model_cfg, paths, seed=0):
  """Freshly initialised values of `paths` only (XLA drops the other inits)."""
  from rvlm import train  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(model=model_cfg, data=dict(seq_len=2)))
  model = vlm.make_model(model_cfg)

  def init(rng):
    flat = traverse_util.flatten_dict(
        nn.unbox(model.init(rng, train.dummy_batch(cfg, 1))["params"]), sep="/")
    return {p: flat[p] for p in paths}
  return {p: np.asarray(v, np.float32)
          for p, v in jax.jit(init)(jax.random.PRNGKey(seed)).items()}


def _tokenizer_fields(tok_dir, config):
  """config.data.tokenizer fields for the tokenizer.json in `tok_dir`, or {}."""
  path = os.path.join(tok_dir, "tokenizer.json")
  if not os.path.exists(path):
    return {}
  import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer.from_file(path)
  special = {}
  tc_path = os.path.join(tok_dir, "tokenizer_config.json")
  if os.path.exists(tc_path):
    special = read_json(tc_path, "tokenizer config")
  text = config.get("text_config") or config

  def name(what):
    value = special.get(f"{what}_token")
    if isinstance(value, dict):
      value = value.get("content")
    if not value and text.get(f"{what}_token_id") is not None:
      ids = text[f"{what}_token_id"]
      value = tok.id_to_token(ids[0] if isinstance(ids, list) else ids)
    return value if value and tok.token_to_id(value) is not None else ""
  bos, eos, pad = name("bos"), name("eos"), name("pad")
  # Qwen2 has no BOS: rvlm's layout opens every prompt with one, so the EOS stands in.
  return dict(kind="hf", bos=bos or eos, eos=eos, pad=pad or eos)


def _read_export_extras(hf_dir):
  """(rvlm config.model dict or None, {path: array}) of an rvlm export."""
  cfg_path = os.path.join(hf_dir, RVLM_CONFIG)
  if not os.path.exists(cfg_path):
    return None, {}
  model = read_json(cfg_path, "rvlm config")
  extra = {}
  extra_path = os.path.join(hf_dir, RVLM_EXTRA)
  if os.path.exists(extra_path):
    with safe_open(extra_path, framework="numpy") as f:
      extra = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
  return model, extra


def _groups(keys):
  """'vision_tower.head.* (13), vision_tower.encoder.layers.2.* (16)': keys by module."""
  counts = {}
  for key in keys:
    parts = key.split(".")
    if "layers" in parts[:-2]:
      cut = parts.index("layers") + 2
    elif "head" in parts[:-1]:
      cut = parts.index("head") + 1
    else:
      cut = len(parts) - 1
    group = ".".join(parts[:cut]) + ".*"
    counts[group] = counts.get(group, 0) + 1
  return ", ".join(f"{g} ({n})" for g, n in sorted(counts.items()))


def _check_accounted(ckpt, used, unused, vision_depth):
  extra = [k for k in ckpt.keys() - used if not keymap.is_unused(k, unused, vision_depth)]
  if extra:
    raise ConversionError(f"{ckpt.dir}: unexpected keys {keymap._short(extra)} (rvlm "  # pylint: disable=protected-access
                          "has no param for them: a different architecture or config?)")
  return sorted(ckpt.keys() - used)


def load_hf(hf_dir, vision_dir=None, seed=0):
  """Reads `hf_dir` (and `vision_dir`) into an `Imported`; writes nothing."""
  hf_dir = os.path.abspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise ConversionError(f"--hf_dir {hf_dir}: no such directory")
  config = read_json(os.path.join(hf_dir, "config.json"))
  layout, arch = hf_config.architecture(config, os.path.join(hf_dir, "config.json"))
  where = os.path.join(hf_dir, "config.json")
  if layout == "vision":
    raise ConversionError(f"{where}: {arch} is a vision tower alone; import it with "
                          "--vision_dir beside a Llama / Qwen2 --hf_dir (or `check` it)")
  exported_model, extra = _read_export_extras(hf_dir)
  ckpt = HFCheckpoint(hf_dir)
  keys = ckpt.keys()
  notes, rule_sets, vision = [], [], None

  if layout == "llava":
    tc, vc = config.get("text_config") or {}, config.get("vision_config") or {}
    family = tc.get("model_type", "llama")
    if family not in ("llama", "qwen2"):
      raise ConversionError(f"{where}: text_config.model_type={family!r} is not supported "
                            "(llama or qwen2)")
    if vc.get("model_type", "clip_vision_model") != "siglip_vision_model":
      raise ConversionError(f"{where}: vision_config.model_type="
                            f"{vc.get('model_type', 'clip_vision_model')!r} is not supported "
                            "(rvlm's ViT is SigLIP's: siglip_vision_model)")
    depth = hf_config.llava_vision_depth(config, where)
    text_prefix = keymap.find_prefix(keys, layout, "text", hf_dir)
    head_key = keymap.find_prefix(keys, layout, "lm_head", hf_dir)
    vision_prefix = keymap.find_prefix(keys, layout, "vision", hf_dir)
    proj_prefix = keymap.find_prefix(keys, layout, "projector", hf_dir)
    model = hf_config.model_config(
        decoder=hf_config.decoder_fields(tc, family, where + " text_config"),
        vit=hf_config.vision_fields(vc, where + " vision_config", depth, final_norm=False),
        projector_act_name=hf_config.projector_act(config, where), tied=head_key is None,
        provenance=hf_config.provenance("llava", config, family))
    rule_sets.append((ckpt, keymap.decoder_rules(model, text_prefix, head_key, head_key is None)
                      + keymap.vision_rules(model, vision_prefix)
                      + keymap.projector_rules(proj_prefix),
                      keymap.unused_patterns(layout, vision_prefix, depth, final_norm=False),
                      depth))
  else:
    family = hf_config.DECODERS[arch]
    text_prefix = keymap.find_prefix(keys, layout, "text", hf_dir)
    head_key = keymap.find_prefix(keys, layout, "lm_head", hf_dir)
    if vision_dir is None and os.path.isdir(os.path.join(hf_dir, VISION_SUBDIR)):
      vision_dir = os.path.join(hf_dir, VISION_SUBDIR)
    vit, vconfig = None, None
    if vision_dir is not None:
      vision_dir = os.path.abspath(vision_dir)
      vwhere = os.path.join(vision_dir, "config.json")
      vconfig = read_json(vwhere)
      vlayout, varch = hf_config.architecture(vconfig, vwhere)
      if vlayout != "vision":
        raise ConversionError(f"{vwhere}: --vision_dir must be a SigLIP vision model, "
                              f"not {varch}")
      vit = hf_config.vision_fields(hf_config.vision_config_of(vconfig), vwhere)
      vision = HFCheckpoint(vision_dir)
    model = hf_config.model_config(
        decoder=hf_config.decoder_fields(config, family, where),
        vit=vit or {}, projector_act_name="gelu_tanh", tied=head_key is None,
        provenance=hf_config.provenance("causal_lm", config, family, vconfig))
    rule_sets.append((ckpt, keymap.decoder_rules(model, text_prefix, head_key, head_key is None),
                      keymap.unused_patterns(layout), 0))
    if vision is not None:
      vprefix = keymap.find_prefix(vision.keys(), "vision", "vision", vision_dir)
      pair = "vision_pair" if vconfig.get("model_type") == "siglip" else "vision"
      rule_sets.append((vision, keymap.vision_rules(model, vprefix),
                        keymap.unused_patterns(pair, vprefix), int(model.vit.depth)))

  if exported_model is not None:  # rvlm's own settings of an rvlm export win
    hf = model.hf
    model = ml_collections.ConfigDict(exported_model)
    model.hf = ml_collections.ConfigDict(dict(model.get("hf") or {}, **hf))
  model.hf.source_dir = hf_dir
  shapes = param_shapes(model)
  flat = {}
  for checkpoint, rules, unused, vdepth in rule_sets:
    tensors, used = keymap.import_tensors(rules, checkpoint, shapes)
    flat.update(tensors)
    dropped = _check_accounted(checkpoint, used, unused, vdepth)
    if dropped:
      notes.append(f"not used by rvlm ({checkpoint.dir}): {_groups(dropped)}")
  for path, value in extra.items():
    if path not in shapes or shapes[path] != value.shape:
      raise ConversionError(f"{hf_dir}/{RVLM_EXTRA}: {path} {value.shape} does not fit the "
                            f"model of {RVLM_CONFIG} ({shapes.get(path)})")
    flat[path] = value
  new = sorted(set(shapes) - set(flat))
  if new:
    flat.update(fresh_params(model, new, seed))
    parts = sorted({p.split("/")[0] if not p.startswith("recursion") else "connector"
                    for p in new})
    notes.append(f"freshly initialised (no weights in the checkpoint): {', '.join(parts)}")
  params = traverse_util.unflatten_dict(flat, sep="/")
  tok_dir = hf_dir
  tokenizer = _tokenizer_fields(hf_dir, config)
  if not tokenizer:
    notes.append(f"no tokenizer.json in {hf_dir}: set config.data.tokenizer yourself")
    tok_dir = None
  return Imported(model=model, params=params, tokenizer=tokenizer, hf_dir=hf_dir,
                  tokenizer_dir=tok_dir, notes=notes)


# ---- writing an rvlm workdir -------------------------------------------------------------

def _fresh_out(out):
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConversionError(f"{out} exists and is not empty; not overwriting it")
  return out


def text_length(model):
  """config.data.seq_len of an imported model: the text positions its HF config allows
  after the image tokens (max_position_embeddings), at most 512."""
  hf = model.get("hf") or {}
  original = json.loads(hf.get("config_json") or "{}")
  text = original.get("text_config") or original
  n_img = (int(model.vit.image_size) // int(model.vit.patch_size)) ** 2
  return max(16, min(512, int(text.get("max_position_embeddings") or 4096) - n_img))


def full_config(model, tokenizer, out):
  """The config an imported workdir's checkpoint carries: what rvlm.predict, evaluate,
  convert and config.model_from_init read (the model, tokenizer and text length)."""
  data = dict(seq_len=text_length(model), tokenizer=dict(kind="embedded"))
  if tokenizer:
    data["tokenizer"] = dict(tokenizer, path=os.path.join(out, "tokenizer.json"))
  return ml_collections.ConfigDict(dict(model=model, data=data, init_from=""))


def write_workdir(imported, out):
  """An rvlm workdir holding the params as checkpoint step 0 (params only).

  `--config.init_from=out` starts training from it; rvlm.predict / evaluate / convert
  export read it like any workdir. Written to a temporary directory first and renamed,
  so a failure leaves nothing behind; an existing non-empty `out` is refused.
  """
  from rvlm import checkpointing  # pylint: disable=g-import-not-at-top
  out = _fresh_out(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
  try:
    if imported.tokenizer_dir:
      for name in TOKENIZER_FILES:
        src = os.path.join(imported.tokenizer_dir, name)
        if os.path.exists(src):
          shutil.copy(src, os.path.join(tmp, name))
    config = full_config(imported.model, imported.tokenizer, out)
    params = jax.tree.map(np.asarray, imported.params)
    with checkpointing.Checkpointer(checkpointing.checkpoint_dir(tmp), keep=1,
                                    async_save=False, config=config) as ckpt:
      ckpt.save(0, {"params": params})
    with open(os.path.join(tmp, "import.json"), "w", encoding="utf-8") as f:
      json.dump({"hf_dir": imported.hf_dir, "notes": imported.notes}, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("wrote %s", out)
  return out
