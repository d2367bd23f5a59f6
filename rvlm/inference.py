"""Loads a trained workdir for inference and turns user inputs into a model batch.

  loaded = inference.load(workdir)                 # config, model, params, tokenizer
  inputs = inference.read_inputs(path, prompt)     # [(id, image path or None, prompt)]
  batch = inference.make_batch(loaded, prompts, image_paths, max_new_tokens=8)

The config is the one the checkpoint was trained with (its 'meta' item), so the model
and tokenizer always match the params. Every problem a user can cause (a workdir that
holds no checkpoint, a missing or unreadable image, a prompt that does not fit, a word
outside the embedded vocabulary) is an `InferenceError` whose text is one line naming
the file, field or value; `rvlm.predict` prints it and exits 2.
"""
import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from rvlm import checkpointing
from rvlm import decode
from rvlm.data import llava
from rvlm.data import preprocess
from rvlm.data import tokenizers
from rvlm.models import presets
from rvlm.models import vlm

# Files a folder input reads (lower-cased extension); everything else in it is ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm")
_PROMPT_ROLES = llava._PROMPT_ROLES  # pylint: disable=protected-access


class InferenceError(Exception):
  """A problem with the user's inputs; str() is one line naming what is wrong."""


@dataclasses.dataclass
class Loaded:
  config: ml_collections.ConfigDict
  model: vlm.VLM
  params: Any          # pytree of jax arrays (unboxed)
  tokenizer: Any       # rvlm.data.tokenizers.*
  step: int
  workdir: str

  @property
  def image_size(self) -> int:
    return int(self.config.model.vit.image_size)

  @property
  def seq_len(self) -> int:
    return int(self.config.data.seq_len)


# ---- loading --------------------------------------------------------------------------

def _unflatten(flat):
  """{'a/b': v} (hparams.json) -> {'a': {'b': v}}."""
  out = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def _config_from(meta_config, workdir):
  """The training config from the meta item (a dict, or a JSON string in older
  checkpoints), else from workdir/hparams.json (flattened 'a/b' keys)."""
  if isinstance(meta_config, str):
    meta_config = json.loads(meta_config)
  if not meta_config:
    path = os.path.join(workdir, "hparams.json")
    try:
      with open(path, encoding="utf-8") as f:
        flat = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise InferenceError(f"{workdir}: the checkpoint holds no config and {path} is "
                           f"unreadable ({type(e).__name__}: {e})") from None
    flat.pop("param_count", None)
    meta_config = _unflatten(flat)
  config = ml_collections.ConfigDict(meta_config)
  if "model" in config:  # options added after the checkpoint was written: their defaults
    config.model = presets.with_option_defaults(config.model)
  return config


def committed_steps(workdir):
  """Committed checkpoint steps of `workdir`, oldest first (no directory is created)."""
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(s) for s in ocp.utils.checkpoint_steps(ckpt_dir))


def load_config(workdir: str, step: int | None = None):
  """(config, step) of `workdir`'s checkpoint `step` (default: the newest committed)."""
  if not os.path.isdir(workdir):
    raise InferenceError(f"workdir {workdir} does not exist")
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  steps = committed_steps(workdir)
  if not steps:
    raise InferenceError(f"no checkpoint in {ckpt_dir}: train first with python -m "
                         f"rvlm.main --config=configs/base.py --workdir={workdir}")
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise InferenceError(f"no checkpoint of step {step} in {ckpt_dir} (committed steps: "
                         f"{', '.join(map(str, steps))})")
  # Checkpointer creates its directory; it exists here, so reading changes nothing.
  with checkpointing.Checkpointer(ckpt_dir, async_save=False) as ckpt:
    meta = ckpt.meta(step)
  return _config_from(meta.get("config"), workdir), int(step)


def abstract_params(config, model):
  """Unboxed ShapeDtypeStructs of the model's params on one device (nothing computed)."""
  # Imported here: rvlm.train pulls in the whole training stack.
  from rvlm import train  # pylint: disable=g-import-not-at-top
  batch = train.dummy_batch(config, 1)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"]
  # A sharding makes orbax restore jax arrays (numpy ones without it), on one device.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      nn.unbox(boxed))


def load(workdir: str, step: int | None = None) -> Loaded:
  """The model, params and tokenizer of `workdir`'s checkpoint `step` (default newest)."""
  workdir = os.path.abspath(workdir)
  config, step = load_config(workdir, step)
  try:
    model = vlm.make_model(config.model)
  except ValueError as e:
    raise InferenceError(f"{workdir}: the checkpoint's config.model is invalid: {e}") from None
  try:
    tokenizer = tokenizers.get_tokenizer(config.data)
  except (ValueError, OSError) as e:
    tcfg = config.data.tokenizer
    raise InferenceError(f"cannot build the tokenizer of {workdir} (config.data.tokenizer "
                         f"kind={tcfg.kind!r} path={tcfg.get('path', '')!r}): {e}") from None
  step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), str(step))
  try:
    params = checkpointing.load_params(step_dir, abstract_params(config, model))
  except ValueError as e:  # check_shapes: one line per mismatching path; keep the first
    lines = str(e).splitlines()
    detail = lines[1].strip() if len(lines) > 1 else lines[0]
    raise InferenceError(f"the checkpoint {step_dir} does not match its own config "
                         f"({detail}; {len(lines) - 1} mismatching paths)") from None
  return Loaded(config=config, model=model, params=params, tokenizer=tokenizer, step=step,
                workdir=workdir)


def for_decoding(loaded: Loaded) -> Loaded:
  """`loaded` with its params in the layout decoding runs (decode.prepare_params: the
  decoder's layers, and the connector's kernels, sliced once). Rebind the name,
  `loaded = for_decoding(loaded)`: the stacked decoder weights are then released rather
  than held beside their sliced copies for the whole run (the decoder's weights twice
  over). The result is for `decode.generate` only; the trainer's forward pass reads the
  stacked layout."""
  return dataclasses.replace(loaded, params=decode.prepare_params(loaded.params))


# ---- inputs ---------------------------------------------------------------------------

def _is_image_file(name):
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _strip_image(text):
  return " ".join(text.replace("<image>", " ").split())


def _record_prompt(rec, where):
  """The first human turn of a LLaVA record (or its 'question'), `<image>` stripped."""
  if isinstance(rec.get("conversations"), list):
    for turn in rec["conversations"]:
      if isinstance(turn, dict) and turn.get("from", turn.get("role")) in _PROMPT_ROLES:
        if not isinstance(turn.get("value"), str):
          raise InferenceError(f"{where}: the first human turn has no string 'value'")
        return _strip_image(turn["value"])
    raise InferenceError(f"{where}: no human/user turn in 'conversations'")
  if isinstance(rec.get("question"), str):
    return _strip_image(rec["question"])
  raise InferenceError(f"{where}: neither 'conversations' nor 'question' "
                       "(LLaVA format, see rvlm/data/llava.py)")


def _read_json_records(path):
  """Yields (where, record) of a LLaVA JSON array or JSONL file, read as training reads
  it (rvlm/data/llava.py), strictly: an unreadable file or line is an InferenceError."""
  try:
    yield from llava._read_records(path, strict=True)  # pylint: disable=protected-access
  except ValueError as e:  # skips.BadInput is one
    raise InferenceError(str(e)) from None


def read_inputs(path: str | None, prompt: str | None):
  """[(id, image path or None, prompt)] for an --image PATH.

  PATH is one image file; a folder (every image file in it, sorted by name, each with
  `prompt`); or a LLaVA-format JSON/JSONL (.json/.jsonl), whose records give the image
  (relative to the JSON's folder) and the prompt (the first human turn; `prompt`, if
  given, replaces it). PATH None: one text-only input. Image files are checked to
  exist here; their bytes are read by `load_image`.
  """
  def need_prompt():
    if prompt is None:
      raise InferenceError(f"--prompt is required with --image={path}" if path
                           else "--prompt is required")
    return prompt

  if path is None:
    return [("prompt", None, need_prompt())]
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path)
                   if _is_image_file(n) and os.path.isfile(os.path.join(path, n)))
    if not names:
      raise InferenceError(f"no image files in folder {path} (looked for "
                           f"{', '.join(IMAGE_EXTENSIONS)})")
    p = need_prompt()
    return [(n, os.path.join(path, n), p) for n in names]
  if path.endswith((".json", ".jsonl")):
    if not os.path.isfile(path):
      raise InferenceError(f"LLaVA file {path} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for k, (where, rec) in enumerate(_read_json_records(path)):
      if not isinstance(rec, dict):
        raise InferenceError(f"{where}: not a JSON object")
      image = rec.get("image")
      if image is not None and not isinstance(image, str):
        raise InferenceError(f"{where}: image {image!r} is not a path")
      image_path = os.path.join(base, image) if image else None
      if image_path and not os.path.isfile(image_path):
        raise InferenceError(f"{where}: image file {image_path} does not exist")
      rec_prompt = prompt if prompt is not None else _record_prompt(rec, where)
      out.append((str(rec.get("id", k)), image_path, rec_prompt))
    if not out:
      raise InferenceError(f"{path}: no records")
    return out
  if not os.path.isfile(path):
    raise InferenceError(f"image file {path} does not exist")
  return [(os.path.basename(path), path, need_prompt())]


def load_image(loaded: Loaded, path: str) -> np.ndarray:
  """[S, S, 3] float32 in [-1, 1], preprocessed as in training (S = vit.image_size)."""
  try:
    image = preprocess.load_image(path)
  except FileNotFoundError:
    raise InferenceError(f"image file {path} does not exist") from None
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError,
    # DecompressionBombError...); all mean the bytes are unusable.
    raise InferenceError(f"cannot read image {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
  return preprocess.normalise(preprocess.resize(image, loaded.image_size))


def _check_vocabulary(loaded, prompt, ids):
  """The embedded word vocabulary is fixed: unknown words are an error, not <unk>."""
  tok = loaded.tokenizer
  if loaded.config.data.tokenizer.kind != "embedded" or tok.unk_id not in ids:
    return
  # pylint: disable=protected-access
  unknown = [w for w in tokenizers._TOKEN_RE.findall(prompt.lower())
             if tok.encode(w) == [tok.unk_id]]
  words = ", ".join(repr(w) for w in dict.fromkeys(unknown))
  raise InferenceError(
      f"prompt {prompt!r}: {words} not in the embedded word vocabulary, which is fixed "
      f"(config.data.tokenizer.kind='embedded'; list it with python -c \"from "
      f"rvlm.data.tokenizers import WordTokenizer; print(WordTokenizer().words())\")")


def encode_prompts(loaded: Loaded, prompts, max_new_tokens: int, pad_to: int | None = None):
  """{'tokens', 'input_mask'} [B, T] int32: [bos] + prompt, right-padded with 0.

  T is the longest row, or `pad_to` (fixed shapes across batches: one compilation).
  Raises InferenceError for words outside the embedded vocabulary and for prompts that
  leave no room for `max_new_tokens` (eos included) within config.data.seq_len.
  """
  tok = loaded.tokenizer
  if int(max_new_tokens) < 1:
    raise InferenceError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  rows = []
  for prompt in prompts:
    ids = tok.encode(prompt)
    _check_vocabulary(loaded, prompt, ids)
    if 1 + len(ids) + max_new_tokens > loaded.seq_len:
      raise InferenceError(
          f"prompt {prompt!r} is too long: bos + {len(ids)} prompt tokens + "
          f"{max_new_tokens} new tokens = {1 + len(ids) + max_new_tokens} > the model's "
          f"text length config.data.seq_len={loaded.seq_len} (shorten the prompt or lower "
          f"--max_new_tokens)")
    rows.append([tok.bos_id] + ids)
  t = max(len(r) for r in rows) if pad_to is None else int(pad_to)
  tokens = np.zeros((len(rows), t), np.int32)
  input_mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    input_mask[i, :len(r)] = 1
  return {"tokens": tokens, "input_mask": input_mask}


def make_batch(loaded: Loaded, prompts, images, max_new_tokens: int = 1,
               pad_to: int | None = None):
  """The decode batch {image, image_mask, tokens, input_mask} for B inputs.

  `images[i]` is an image path, an [S, S, 3] float32 array from `load_image`, or None
  (text only: zeros and image_mask 0). `max_new_tokens` is checked as in
  `encode_prompts` (the default, 1, only asks that the eos fit).
  """
  if len(prompts) != len(images):
    raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
  s = loaded.image_size
  pixels = np.zeros((len(images), s, s, 3), np.float32)
  image_mask = np.zeros((len(images),), np.int32)
  for i, image in enumerate(images):
    if image is None:
      continue
    pixels[i] = load_image(loaded, image) if isinstance(image, str) else image
    image_mask[i] = 1
  return {"image": pixels, "image_mask": image_mask,
          **encode_prompts(loaded, prompts, max_new_tokens, pad_to=pad_to)}
