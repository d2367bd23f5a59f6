"""RecursiveVLM on LLaVA-format data (JSON/JSONL records + an image folder).

  python -m rvlm.main --config=configs/llava_format.py --workdir=/tmp/rvlm_llava \\
      --config.data.train_json=/data/train.jsonl \\
      --config.data.eval_json=/data/val.jsonl --config.data.image_dir=/data/images

Real conversations need a tokenizer for free text. The default needs no file: UTF-8
bytes (260 ids, so the model's vocab_size is set to 260) with 256 text positions.
Shorter sequences come from a sentencepiece model trained on the train file
  python -m rvlm.data.train_tokenizer --config=configs/llava_format.py \
      --config.data.train_json=/data/train.jsonl --out=/tmp/sp.model --vocab_size=1024
then --config.data.tokenizer.kind=sentencepiece --config.data.tokenizer.path=/tmp/sp.model
--config.model.vocab_size=1024 (or kind=hf with a tokenizer.json).
"""
from configs import base


def get_config(arg=None):
  """base.get_config(arg) with the data block switched to LLaVA-format files."""
  c = base.get_config(arg)
  c.data.name = "llava"
  c.data.train_json = ""
  c.data.eval_json = ""
  c.data.image_dir = ""
  c.data.seq_len = 256
  c.data.tokenizer.kind = "bytes"
  c.data.tokenizer.path = ""
  c.model.vocab_size = 260
  c.eval.splits = ("val",)
  return c
