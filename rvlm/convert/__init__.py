"""Hugging Face <-> rvlm: import pretrained models, recursify them, export, check.

  python -m rvlm.convert import --hf_dir=D --out=O      (see rvlm/convert/__main__.py)

Modules: safetensors_io (lazy reading, writing), hf_config (config.json <-> config.model),
keymap (which HF tensor is which rvlm param), importer, exporter, recursify, check.
"""
