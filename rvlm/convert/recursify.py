"""A standard (imported) model -> a RecursiveVLM that starts out as that model.

The Recursive Connector is added with its projection kernels at zero, so its output is
E_0 + alpha * 0 = E_0: every recursion step reruns the original model on the original
input, and step-r logits equal the original logits for every r until training moves the
connector (the Monotonic Recursion Loss then rewards steps that improve on earlier ones).

Two ways in, with the same result:
  recursify(model_cfg, params, num_steps)            in memory (tests, the CLI)
  configs/experiments/recursify.py + --config.init_from=IMPORTED
      the trainer takes config.model's architecture and the tokenizer from the
      imported workdir (`resolve_from_init`) and initialises the connector fresh
      (config.init_from_allow_new)
"""
import copy

import ml_collections
from absl import logging
from flax import traverse_util

from rvlm.convert import importer

CONNECTOR = "recursion/step/connector/"
# What the fine-tuning config decides; everything else of config.model comes from the
# imported model (its architecture has to match its params).
OWN_FIELDS = ("recursion", "connector", "dtype", "param_dtype", "remat_policy", "scan_layers")


def recursive_config(model_cfg, num_steps, connector=None):
  m = copy.deepcopy(model_cfg)
  m.recursion.update(dict(mode="connector", num_steps=int(num_steps)))
  if connector:
    m.connector.update(connector)
  m.connector.num_layers = min(int(m.connector.num_layers), int(m.decoder.depth))
  if m.connector.init != "zeros" or m.connector.base != "embed":
    raise ValueError("recursify needs config.model.connector.init='zeros' and base='embed' "
                     f"(got {m.connector.init!r}, {m.connector.base!r}): only then does every "
                     "step start as the original model")
  return m


def recursify(model_cfg, params, num_steps, connector=None, seed=0):
  """(config.model, params) of the recursive model; the source params are unchanged."""
  m = recursive_config(model_cfg, num_steps, connector)
  shapes = importer.param_shapes(m)
  new = sorted(p for p in shapes if p.startswith(CONNECTOR))
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  flat.update(importer.fresh_params(m, new, seed))
  missing = sorted(set(shapes) - set(flat))
  if missing:
    raise ValueError(f"recursify: params lack {', '.join(missing[:5])}")
  return m, traverse_util.unflatten_dict(flat, sep="/")


def resolve_from_init(config):
  """config.model (but OWN_FIELDS) and the tokenizer from config.init_from's checkpoint.

  Active when config.model_from_init is set (configs/experiments/recursify.py);
  otherwise `config` is returned unchanged.
  """
  if not config.get("model_from_init", False):
    return config
  if not config.init_from:
    raise ValueError("config.model_from_init=True needs config.init_from (a workdir "
                     "written by python -m rvlm.convert import)")
  from rvlm import inference  # pylint: disable=g-import-not-at-top
  try:
    source, _ = inference.load_config(config.init_from)
  except inference.InferenceError as e:
    raise ValueError(f"config.init_from: {e}") from None
  config = copy.deepcopy(config)
  own = {f: copy.deepcopy(config.model[f]) for f in OWN_FIELDS if f in config.model}
  with config.ignore_type():
    config.model = ml_collections.ConfigDict(source.model.to_dict())
    config.model.update(own)
    depth = int(config.model.decoder.depth)
    if int(config.model.connector.num_layers) > depth:  # k = 4 on a shallower decoder
      logging.info("connector.num_layers %d > decoder depth %d: sampling every layer",
                   config.model.connector.num_layers, depth)
      config.model.connector.num_layers = depth
    if source.data.tokenizer.get("kind") == "hf":
      config.data.tokenizer = ml_collections.ConfigDict(source.data.tokenizer.to_dict())
  config.model_from_init = False  # resolved: the saved config is self-contained
  logging.info("config.model from %s (%s decoder, %d layers, vocab %d); recursion %s R=%d",
               config.init_from, config.model.get("hf", {}).get("text_family", "?"),
               config.model.decoder.depth, config.model.vocab_size,
               config.model.recursion.mode, config.model.recursion.num_steps)
  return config
