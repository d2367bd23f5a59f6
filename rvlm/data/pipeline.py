"""grain pipelines: sources -> shuffle/repeat -> per-process shard -> preprocess
-> (workers) -> count/drop skips -> batch.

Order of stages, and why:
  * shuffle then repeat: grain reseeds the shuffle per epoch (seed + epoch), so
    each epoch has a fresh order and the stream stays random-access;
  * mixtures mix already shuffled+repeated components (grain's advice for keeping
    the proportions) with MapDataset.mix;
  * the per-process shard is a stride over that global stream, so processes see
    disjoint examples and each yields global_batch // process_count per step;
  * preprocessing and chunking (batches that still hold bad rows, marked) run in
    the grain workers (mp_prefetch) when num_workers > 0; counting and dropping the
    marked rows and cutting exact batches run in the main process (batching.py), so
    skip counts are exact for any number of workers (see skips.py).
The returned iterator is grain's DatasetIterator: next(it), get_state() (JSON-able)
and set_state() for exact resume, close() to stop the workers.
"""
from absl import flags
import grain
import numpy as np

from rvlm.data import batching
from rvlm.data import buckets
from rvlm.data import embedded
from rvlm.data import families
from rvlm.data import llava
from rvlm.data import preprocess
from rvlm.data import skips
from rvlm.data import tokenizers

NAMES = ("embedded", "embedded_tfds", "llava")


def family_names(config):
  """Family name per `family` index; the same list for every source and config."""
  del config
  return list(families.ALL_FAMILIES)


def _image_size(config):
  size, patch = int(config.model.vit.image_size), int(config.model.vit.patch_size)
  if size <= 0 or patch <= 0 or size % patch:
    raise ValueError(f"config.model.vit.image_size={size} must be a positive multiple "
                     f"of config.model.vit.patch_size={patch}")
  return size, patch


def parse_mixture(mixture):
  """((name, weight), ...) from a sequence of pairs or 'name:w,name:w'."""
  if isinstance(mixture, str):
    pairs = []
    for item in (m for m in mixture.split(",") if m.strip()):
      name, _, w = item.partition(":")
      pairs.append((name.strip(), w or "1"))
    mixture = pairs
  out = []
  for item in mixture:
    try:
      name, w = item
      out.append((str(name), float(w)))
    except (TypeError, ValueError):
      raise ValueError(f"config.data.mixture: {item!r} is not (name, weight)") from None
  for name, w in out:
    if name not in NAMES or w < 0:
      raise ValueError(f"config.data.mixture: ({name!r}, {w}) needs a name in {NAMES} "
                       "and a non-negative weight")
  if out and sum(w for _, w in out) <= 0:
    raise ValueError("config.data.mixture weights must not all be zero")
  return tuple(out)


def validate(config, process_count=1):
  """Checks config.data against itself and the model; raises ValueError naming fields."""
  d = config.data
  if d.name not in NAMES:
    raise ValueError(f"config.data.name={d.name!r} unknown; choose from {NAMES}")
  if d.seq_len == 0:
    raise ValueError("config.data.seq_len=0 (auto) is settled by the trainer in its workdir "
                     "(WORKDIR/data_stats.json, rvlm/data/resolve.py); here give a length")
  for field in ("batch_size", "seq_len"):
    if not isinstance(d[field], int) or d[field] <= 0:
      raise ValueError(f"config.data.{field}={d[field]!r} must be a positive int")
  if not isinstance(d.num_workers, int) or d.num_workers < 0:
    raise ValueError(f"config.data.num_workers={d.num_workers!r} must be an int >= 0")
  if process_count <= 0 or d.batch_size % process_count:
    raise ValueError(f"config.data.batch_size={d.batch_size} is not divisible by "
                     f"process_count={process_count}")
  _image_size(config)
  buckets.boundaries(d)
  parse_mixture(d.mixture)
  tok = tokenizers.get_tokenizer(d)
  model_vocab = config.get("model", {}).get("vocab_size")
  if model_vocab is not None and tok.vocab_size > model_vocab:
    raise ValueError(f"the {d.tokenizer.kind} tokenizer has {tok.vocab_size} tokens but "
                     f"config.model.vocab_size={model_vocab}")
  names = {d.name} | {n for n, _ in parse_mixture(d.mixture)}
  if names & {"embedded", "embedded_tfds"}:
    spec = embedded.make_spec(d.embedded, *_image_size(config), comp=False)
    fams, _ = embedded.family_weights(d.embedded, "train")
    if d.tokenizer.kind == "embedded":
      # bos + question + one-word answer + eos must fit, or every example would be
      # skipped as too long: that is a config error, so say it now.
      need = families.max_question_words(spec, fams) + 3
      if d.seq_len < need:
        raise ValueError(f"config.data.seq_len={d.seq_len} is too short for the "
                         f"embedded questions (need {need})")


def source(config, name, split, stream=0):
  """A random-access source of records for one (source name, split)."""
  d = config.data
  if name == "embedded":
    size, patch = _image_size(config)
    return embedded.EmbeddedSource(d.embedded, image_size=size, patch_size=patch,
                                   seed=config.seed, split=split, stream=stream)
  if name == "embedded_tfds":
    from rvlm.data import tfds_embedded  # pylint: disable=g-import-not-at-top
    return tfds_embedded.TfdsSource(config, split)
  if name == "llava":
    if split == "train":
      path = d.train_json
    elif split in ("val", "test", "eval"):
      path = d.eval_json
    else:
      raise ValueError(f"llava split {split!r} unknown; use train, or val/test/eval "
                       "(all read config.data.eval_json)")
    return llava.LlavaSource(path, d.image_dir, strict=d.strict)
  raise ValueError(f"config.data.name={name!r} unknown; choose from {NAMES}")


def _preprocessor(config):
  return preprocess.Preprocess(
      tokenizers.LazyTokenizer(config.data), image_size=_image_size(config)[0],
      seq_len=config.data.seq_len, strict=config.data.strict)


def _seed(config):
  return (int(config.seed) * 1_000_003 + int(config.data.shuffle_seed)) % 2**32


def build_train_iterator(config, process_index=0, process_count=1, stream=0):
  """Infinite iterator of local train batches (global batch // process_count).

  `stream` selects another example stream of the embedded source (a curriculum level).
  """
  validate(config, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  d = config.data
  mixture = parse_mixture(d.mixture) or ((d.name, 1.0),)
  seed = _seed(config)
  parts = [grain.MapDataset.source(source(config, name, "train", stream))
           .shuffle(seed=(seed + 7919 * k) % 2**32).repeat()
           for k, (name, _) in enumerate(mixture)]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(
      parts, [w for _, w in mixture])
  local = d.batch_size // process_count
  ds = ds[process_index::process_count].map(_preprocessor(config))
  # Chunks of `local` preprocessed examples, bad rows still inside (marked). Made
  # on the random-access side so chunk k is the same whichever worker builds it:
  # 0 and N workers give identical batches.
  ds = ds.batch(local, drop_remainder=True)
  # Inside workers the worker processes are the parallelism, so no reader threads;
  # without workers one thread overlaps preprocessing with the train step.
  threads = 0 if d.num_workers else 1
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=2 * threads))
  if d.num_workers > 0:
    # grain reads absl flags when it starts workers; outside an absl app (tests,
    # notebooks) they are unparsed, which grain treats as an error.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  ds = batching.CompactBatches(ds, local)
  return iter(ds)


def build_eval_batches(config, split, batch_size, num_examples, process_index=0,
                       process_count=1, only_hops=None):
  """A list of local eval batches over the first `num_examples` of `split`.

  `only_hops` keeps just the examples with that hop count (a curriculum's probe).
  Deterministic and built eagerly in this process. The last global batch is filled
  with padding examples (example_mask 0); process p gets rows
  [p * local, (p + 1) * local) of every global batch.
  """
  validate(config, process_count)
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"eval batch_size={batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  src = source(config, config.data.name, split)
  pre, keep = _preprocessor(config), skips.CountAndDrop()
  exs = [preprocess.drop_skip(ex) for ex in
         (pre(src[i]) for i in range(min(int(num_examples), len(src)))) if keep(ex)]
  if only_hops is not None:
    exs = [ex for ex in exs if int(ex["hops"]) == only_hops]
  if not exs:
    raise ValueError(f"no usable eval examples in split {split!r}")
  for ex in exs:
    ex["example_mask"] = np.int32(1)
  blank = {k: np.zeros_like(v) for k, v in exs[0].items()}
  exs += [blank] * (-len(exs) % batch_size)
  local = batch_size // process_count
  lengths = buckets.boundaries(config.data)
  batches = []
  for start in range(0, len(exs), batch_size):
    rows = exs[start + process_index * local: start + (process_index + 1) * local]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if lengths:  # from the global batch, so that every process cuts to the same length
      whole = {"input_mask": np.stack([r["input_mask"] for r in exs[start:start + batch_size]])}
      batch = buckets.trim(batch, buckets.bucket_length(buckets.needed_length(whole), lengths))
    batches.append(batch)
  return batches
