"""Conversion checker: rvlm and transformers on the same random inputs, per model part.

  diffs = check(hf_dir)   # [(part, max |rvlm - HF|, what was compared)]

Parts compared (float32 both sides, the HF model run with eager attention):
  vision tower   SigLIP features rvlm's projector reads (LLaVA: vision_feature_layer's
                 hidden state; SiglipVisionModel: last_hidden_state)
  projector      LLaVA's image features after the multimodal projector
  decoder        next-token logits of a text-only batch (no image)
  full model     LLaVA's logits at the text positions, image tokens first
Needs the `oracle` extra (torch, transformers).
"""
import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from rvlm.convert import hf_config
from rvlm.convert import importer
from rvlm.convert import keymap
from rvlm.convert.safetensors_io import ConversionError, HFCheckpoint, read_json
from rvlm.models import vit as vit_lib
from rvlm.models import vlm


def _oracle():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(f"check needs torch and transformers ({e}): pip install -e "
                          "'.[oracle]'") from None
  return torch, transformers


def _hf_model(transformers, arch, path):
  cls = getattr(transformers, arch)
  model = cls.from_pretrained(path, dtype="float32", attn_implementation="eager")
  return model.eval()


def _vit(model_cfg, params, images):
  module = vit_lib.ViT(**dict(model_cfg.vit), dtype=jnp.float32)
  return np.asarray(module.apply({"params": params["vit"]}, images))


def _rvlm_logits(model_cfg, params, tokens, images=None):
  """Logits [B, T, V] at the text positions (no image when `images` is None)."""
  b, t = tokens.shape
  s = int(model_cfg.vit.image_size)
  batch = dict(tokens=jnp.asarray(tokens, jnp.int32), input_mask=jnp.ones((b, t), jnp.int32),
               mask_ar=jnp.ones((b, t), jnp.int32), mask_loss=jnp.ones((b, t), jnp.int32),
               image=jnp.zeros((b, s, s, 3)) if images is None else jnp.asarray(images),
               image_mask=jnp.full((b,), 0 if images is None else 1, jnp.int32))
  model = vlm.make_model(model_cfg)
  out = model.apply({"params": params}, batch)
  return np.asarray(model.apply({"params": params}, out["hidden"][-1], method=vlm.VLM.logits))


def _diff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ConversionError(f"shapes differ: rvlm {a.shape} vs transformers {b.shape}")
  return float(np.max(np.abs(a - b)))


def _vision_only(hf_dir, config):
  """(config.model, params) with the SigLIP tower of a vision-only directory."""
  where = os.path.join(hf_dir, "config.json")
  vit = hf_config.vision_fields(hf_config.vision_config_of(config), where)
  model = hf_config.model_config(
      decoder=dict(vocab_size=8, decoder=dict(width=8, depth=1, num_heads=1, num_kv_heads=1,
                                              head_dim=8, mlp_dim=8)),
      vit=vit, projector_act_name="gelu_tanh", tied=True,
      provenance=hf_config.provenance("vision", config))
  ckpt = HFCheckpoint(hf_dir)
  prefix = keymap.find_prefix(ckpt.keys(), "vision", "vision", hf_dir)
  flat, _ = keymap.import_tensors(keymap.vision_rules(model, prefix), ckpt,
                                  importer.param_shapes(model))
  params = traverse_util.unflatten_dict(flat, sep="/")
  return model, params


def check(hf_dir, seed=0, batch=2, seq_len=12):
  """[(part, max abs difference, description)] for the model in `hf_dir`."""
  torch, transformers = _oracle()
  hf_dir = os.path.abspath(hf_dir)
  config = read_json(os.path.join(hf_dir, "config.json"))
  layout, arch = hf_config.architecture(config, os.path.join(hf_dir, "config.json"))
  rng = np.random.default_rng(seed)
  results = []

  def images_for(model_cfg):
    s = int(model_cfg.vit.image_size)
    return rng.standard_normal((batch, s, s, 3)).astype(np.float32)

  def torch_pixels(images):
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

  if layout == "vision":
    model_cfg, params = _vision_only(hf_dir, config)
    images = images_for(model_cfg)
    hf = _hf_model(transformers, "SiglipVisionModel", hf_dir)
    with torch.no_grad():
      ref = hf(pixel_values=torch_pixels(images)).last_hidden_state.numpy()
    results.append(("vision tower", _diff(_vit(model_cfg, params, images), ref),
                    "last_hidden_state"))
    return results

  imported = importer.load_hf(hf_dir)
  m, params = imported.model, imported.params
  vocab = int(m.vocab_size)
  image_token = config.get("image_token_index", config.get("image_token_id"))
  choices = np.array([i for i in range(vocab) if i != image_token])
  tokens = rng.choice(choices, size=(batch, seq_len))
  ids = torch.from_numpy(tokens.astype(np.int64))

  if layout == "causal_lm":
    hf = _hf_model(transformers, arch, hf_dir)
    with torch.no_grad():
      ref = hf(input_ids=ids).logits.numpy()
    results.append(("decoder", _diff(_rvlm_logits(m, params, tokens), ref),
                    f"logits of {batch}x{seq_len} random tokens"))
    vision_dir = os.path.join(hf_dir, importer.VISION_SUBDIR)
    if os.path.isdir(vision_dir):
      results += [(f"{part} ({importer.VISION_SUBDIR}/)", d, what)
                  for part, d, what in check(vision_dir, seed, batch, seq_len)]
    return results

  hf = _hf_model(transformers, arch, hf_dir)
  images = images_for(m)
  pixels = torch_pixels(images)
  with torch.no_grad():
    tower = hf.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
    ref_vision = tower.hidden_states[config.get("vision_feature_layer", -2)].numpy()
    ref_proj = hf.model.multi_modal_projector(tower.hidden_states[
        config.get("vision_feature_layer", -2)]).numpy()
    ref_text = hf(input_ids=ids).logits.numpy()
    n_img = ref_proj.shape[1]
    full_ids = torch.cat([torch.full((batch, n_img), int(image_token)), ids], dim=1)
    ref_full = hf(input_ids=full_ids, pixel_values=pixels).logits[:, n_img:].numpy()
  feats = _vit(m, params, images)
  proj = vit_lib.Projector(m.projector.kind, int(m.decoder.width), jnp.float32,
                           act=m.projector.act).apply({"params": params["projector"]}, feats)
  results += [
      ("vision tower", _diff(feats, ref_vision),
       f"hidden_states[{config.get('vision_feature_layer', -2)}]"),
      ("projector", _diff(proj, ref_proj), "image features"),
      ("decoder", _diff(_rvlm_logits(m, params, tokens), ref_text), "text-only logits"),
      ("full model", _diff(_rvlm_logits(m, params, tokens, images), ref_full),
       f"logits at {seq_len} text positions after {n_img} image tokens")]
  return results
