"""Tiny random-weight Hugging Face models saved as the Hub lays them out (config.json,
safetensors, tokenizer.json), built offline with transformers for the conversion tests.

Each builder returns the directory it wrote. Weights are random (transformers' own init,
then a seeded perturbation of every tensor so that norms, biases and zero-initialised
parts are not trivially 1 or 0 and a transposed or swapped tensor shows up as a
difference).
"""
import json
import os

VOCAB = 64
IMAGE_TOKEN = 63
WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(IMAGE_TOKEN - 4)] + ["<image>"]


def _perturb(model, seed):
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model


def write_tokenizer(directory):
  """A word-level tokenizer.json over WORDS (ids = positions) + tokenizer_config.json."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                              unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<pad>", "<s>", "</s>", "<image>"])
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)


def text_config(family, *, kv_heads=2, tied=False, bias=False, layers=2):
  from transformers import LlamaConfig, Qwen2Config  # pylint: disable=g-import-not-at-top
  common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                tie_word_embeddings=tied, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, max_position_embeddings=128)
  if family == "llama":
    return LlamaConfig(**common, attention_bias=bias, mlp_bias=bias,
                       rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
  return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 20000.0})


def vision_config(layers=3):
  from transformers import SiglipVisionConfig  # pylint: disable=g-import-not-at-top
  return SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=layers,
                            num_attention_heads=2, image_size=16, patch_size=4,
                            layer_norm_eps=1e-5)


def causal_lm(directory, family, seed=0, **kwargs):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[family]
  _perturb(cls(text_config(family, **kwargs)), seed).save_pretrained(directory)
  write_tokenizer(directory)
  return str(directory)


def siglip(directory, seed=0, layers=3):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import SiglipVisionModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  _perturb(SiglipVisionModel(vision_config(layers)), seed).save_pretrained(directory)
  return str(directory)


def llava(directory, family="qwen2", seed=0, feature_layer=-2, **kwargs):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlavaConfig, LlavaForConditionalGeneration  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  config = LlavaConfig(vision_config=vision_config(), text_config=text_config(family, **kwargs),
                       image_token_index=IMAGE_TOKEN, vision_feature_layer=feature_layer,
                       vision_feature_select_strategy="full", projector_hidden_act="gelu",
                       image_seq_length=16)
  _perturb(LlavaForConditionalGeneration(config), seed).save_pretrained(directory)
  write_tokenizer(directory)
  return str(directory)
