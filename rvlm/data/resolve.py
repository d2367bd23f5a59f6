"""Settles the data choices a config leaves to the data, once per workdir.

Own data (configs/llava_format.py) comes with no tokenizer and an unknown text length.
Byte tokens at a fixed 256 positions ran at a tenth of the embedded default's speed on
short VQA records; a tokenizer and a length fitted to the data run at its speed.

  config.data.tokenizer.kind = "auto"   a BPE sentencepiece model with up to
                                        `tokenizer.auto_vocab_size` pieces, trained on the
                                        train split's text into WORKDIR/tokenizer/sp.model;
                                        config.model.vocab_size becomes its size
  config.data.seq_len = 0               the longest laid-out train record (bos, every turn
                                        with its eos), rounded up to a multiple of 8 and
                                        capped at `data.max_seq_len`

Both are computed on the first run and reused on resume (the model file, and
WORKDIR/data_stats.json keyed by the train file, its size and mtime, and the tokenizer),
so a resumed run sees the same values. The resolved config is what the trainer saves
with its checkpoints and hparams, so inference needs nothing else. Both are logged.
"""
import json
import os

import ml_collections
import numpy as np
from absl import logging

STATS_FILE = "data_stats.json"
TOKENIZER_FILE = os.path.join("tokenizer", "sp.model")


def _train_key(config):
  d = config.data
  path = d.get("train_json", "")
  info = os.stat(path) if path and os.path.exists(path) else None
  return {"name": d.name, "train_json": os.path.abspath(path) if path else "",
          "size": info.st_size if info else None, "mtime": info.st_mtime if info else None,
          "tokenizer": f"{d.tokenizer.kind}:{d.tokenizer.path}"}


def _sync(name):
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _is_writer():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def resolve_tokenizer(config, workdir):
  from rvlm.data import tokenizers, train_tokenizer  # pylint: disable=g-import-not-at-top
  d = config.data
  path = os.path.join(os.path.abspath(workdir), TOKENIZER_FILE)
  vocab = int(d.tokenizer.get("auto_vocab_size", 1024))
  if os.path.exists(path):
    logging.info("config.data.tokenizer.kind='auto': reusing %s", path)
  else:
    if _is_writer():
      logging.info("config.data.tokenizer.kind='auto': training a sentencepiece model "
                   "(up to %d pieces) on the train text into %s", vocab, path)
      tmp = path + ".tmp"
      train_tokenizer.train(train_tokenizer.texts(config, 1_000_000), tmp, vocab)
      os.replace(tmp, path)
    _sync("rvlm_auto_tokenizer")
  d.tokenizer.kind, d.tokenizer.path = "sentencepiece", path
  config.model.vocab_size = tokenizers.get_tokenizer(d).vocab_size
  logging.info("tokenizer: sentencepiece %s, %d pieces (config.model.vocab_size)", path,
               config.model.vocab_size)


def text_lengths(config):
  """The laid-out text length (bos + every turn + its eos) of every train record."""
  from rvlm.data import pipeline, tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.get_tokenizer(config.data)
  src = pipeline.source(config, config.data.name, "train")
  lengths = []
  for i in range(len(src)):
    turns = src[i]["turns"]
    lengths.append(1 + sum(len(tok.encode(q)) + len(tok.encode(a)) + 1 for q, a in turns))
  return np.asarray(lengths)


def resolve_seq_len(config, workdir):
  d = config.data
  path = os.path.join(workdir, STATS_FILE)
  key = _train_key(config)
  stats = None
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("key") == key:
      stats = saved
  if stats is None:
    lengths = text_lengths(config)
    cap = int(d.get("max_seq_len", 512))
    longest = int(lengths.max())
    stats = {"key": key, "records": int(lengths.size), "longest": longest,
             "p50": float(np.percentile(lengths, 50)), "p99": float(np.percentile(lengths, 99)),
             "seq_len": min(cap, -(-longest // 8) * 8), "max_seq_len": cap}
    if _is_writer():
      with open(path + ".tmp", "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
      os.replace(path + ".tmp", path)
    _sync("rvlm_auto_seq_len")
  d.seq_len = int(stats["seq_len"])
  logging.info("config.data.seq_len=0 (auto): %d text positions from %d train records "
               "(longest %d, median %.0f, 99th percentile %.0f%s)", d.seq_len,
               stats["records"], stats["longest"], stats["p50"], stats["p99"],
               f"; longer ones keep their leading turns or are skipped, cap "
               f"data.max_seq_len={stats['max_seq_len']}"
               if stats["longest"] > d.seq_len else "")


def resolve(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy of `config` with tokenizer 'auto' and seq_len 0 settled for `workdir`."""
  d = config.data
  if d.tokenizer.kind != "auto" and int(d.seq_len) != 0:
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  os.makedirs(os.path.join(workdir, os.path.dirname(TOKENIZER_FILE)), exist_ok=True)
  if config.data.tokenizer.kind == "auto":
    resolve_tokenizer(config, workdir)
  if int(config.data.seq_len) == 0:
    resolve_seq_len(config, workdir)
  return config
