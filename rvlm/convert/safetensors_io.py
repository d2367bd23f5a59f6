"""Reading and writing Hugging Face safetensors checkpoints (never pickle).

A checkpoint directory holds `model.safetensors`, or shards listed by
`model.safetensors.index.json` ({"weight_map": {key: shard file}}). Tensors are read one
at a time on demand (safetensors memory-maps the file), so converting a large model
holds one tensor plus the converted tree, never a whole shard. Every tensor is
returned as float32 numpy (bf16 / f16 checkpoints are widened: rvlm keeps float32
params).
"""
import json
import os

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ConversionError(ValueError):
  """A checkpoint or config that cannot be converted; str() names the keys or field."""


def _listed(names, limit=8):
  names = sorted(names)
  more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


class HFCheckpoint:
  """The tensors of one Hugging Face directory, by key, read lazily.

  Raises ConversionError when the directory has no safetensors weights (naming any
  pickle files it does have), when the index is unreadable, or when a shard the index
  names is missing (naming the shard and some of its keys).
  """

  def __init__(self, hf_dir):
    self.dir = os.path.abspath(hf_dir)
    if not os.path.isdir(self.dir):
      raise ConversionError(f"{self.dir}: no such directory")
    index = os.path.join(self.dir, INDEX_FILE)
    single = os.path.join(self.dir, SINGLE_FILE)
    if os.path.exists(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{index}: unreadable safetensors index "
                              f"({type(e).__name__}: {e})") from None
      by_shard = {}
      for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
      missing = [s for s in by_shard if not os.path.exists(os.path.join(self.dir, s))]
      if missing:
        raise ConversionError(
            f"{self.dir}: shard(s) {_listed(missing)} named by {INDEX_FILE} are missing; "
            f"they hold {_listed(k for s in missing for k in by_shard[s])}")
      self._shard_of = dict(weight_map)
    elif os.path.exists(single):
      with safe_open(single, framework="numpy") as f:
        self._shard_of = {k: SINGLE_FILE for k in f.keys()}
    else:
      pickles = [n for n in os.listdir(self.dir) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
      hint = (f"; it has {_listed(pickles)}, which rvlm does not read (pickle): convert "
              "them to safetensors first" if pickles else "")
      raise ConversionError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    self._shapes = {}

  def keys(self):
    return set(self._shard_of)

  def __contains__(self, key):
    return key in self._shard_of

  def _read(self, shard, fn):
    # A fresh handle per read: a kept-open handle keeps the shard memory-mapped, and every
    # page already read then counts towards the process's resident memory.
    path = os.path.join(self.dir, shard)
    try:
      with safe_open(path, framework="numpy") as f:
        return fn(f)
    except Exception as e:  # pylint: disable=broad-except  (safetensors raises several)
      raise ConversionError(f"{path}: unreadable safetensors file "
                            f"({type(e).__name__}: {e})") from None

  def shape(self, key):
    shard = self._shard_of[key]
    if shard not in self._shapes:
      self._shapes[shard] = self._read(
          shard, lambda f: {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return self._shapes[shard][key]

  def get(self, key):
    """The tensor `key` as float32 numpy (read into memory, not a view of the file)."""
    if key not in self._shard_of:
      raise ConversionError(f"{self.dir}: missing tensor {key}")
    tensor = self._read(self._shard_of[key], lambda f: f.get_tensor(key) if key in f.keys()
                        else None)
    if tensor is None:
      raise ConversionError(f"{self.dir}/{self._shard_of[key]}: {INDEX_FILE} names {key}, "
                            "but the shard does not hold it")
    return np.asarray(tensor, dtype=np.float32)


def read_json(path, what="config"):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConversionError(f"{path}: missing ({what})") from None
  except (OSError, ValueError) as e:
    raise ConversionError(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None


def write_safetensors(directory, tensors, filename=SINGLE_FILE, max_shard_bytes=4 << 30,
                      metadata=None):
  """Writes {key: array} as one file, or shards + an index past `max_shard_bytes`.

  Returns the file names written.
  """
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  metadata = dict(metadata or {"format": "pt"})
  shards, current, size = [], {}, 0
  for key in sorted(tensors):
    nbytes = tensors[key].nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = tensors[key]
    size += nbytes
  shards.append(current)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, filename), metadata=metadata)
    return [filename]
  stem = filename[:-len(".safetensors")]
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, name), metadata=metadata)
    names.append(name)
    weight_map.update({k: name for k in shard})
  index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(directory, f"{stem}.safetensors.index.json"), "w",
            encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return names + [f"{stem}.safetensors.index.json"]
