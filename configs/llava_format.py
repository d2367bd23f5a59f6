"""RecursiveVLM on your own LLaVA-format data (JSON/JSONL records + an image folder).

  python -m rvlm.main --config=configs/llava_format.py --workdir=/tmp/rvlm_llava \\
      --config.data.train_json=/data/train.jsonl \\
      --config.data.eval_json=/data/val.jsonl --config.data.image_dir=/data/images

Fitted to the data, once per workdir (rvlm/data/resolve.py; reused on resume, logged):
  * tokenizer kind 'auto': a BPE sentencepiece model (up to 1,024 pieces) trained on the
    train file's text into WORKDIR/tokenizer/sp.model; model.vocab_size follows it;
  * seq_len 0: the longest laid-out train record, rounded up to a multiple of 8 (cap
    data.max_seq_len = 512), cached in WORKDIR/data_stats.json;
  * buckets 'auto': each batch is cut to the smallest of 16, 32, 64, ... seq_len text
    positions that holds its longest record (rvlm/data/buckets.py).
Byte tokens at a fixed 256 positions, the earlier default, ran about 10x slower on
short VQA records (benchmarks/own_data_throughput.py measures both against the embedded
default). Your own tokenizer: --config.data.tokenizer.kind=sentencepiece (or hf)
--config.data.tokenizer.path=... --config.model.vocab_size=N; a fixed length:
--config.data.seq_len=N.
"""
from configs import base


def get_config(arg=None):
  """base.get_config(arg) with the data block switched to LLaVA-format files."""
  c = base.get_config(arg)
  c.data.name = "llava"
  c.data.train_json = ""
  c.data.eval_json = ""
  c.data.image_dir = ""
  c.data.seq_len = 0             # auto: from the data
  c.data.buckets = "auto"
  c.data.tokenizer.kind = "auto"
  c.data.tokenizer.path = ""
  c.model.vocab_size = 1024      # replaced by the auto tokenizer's size
  c.eval.splits = ("val",)
  return c
