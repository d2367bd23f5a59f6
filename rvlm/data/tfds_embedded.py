"""The embedded dataset as a tfds builder (array_record; no TensorFlow needed).

Build once, then train from files with config.data.name='embedded_tfds':
  python -m rvlm.data.tfds_embedded --config=configs/base.py \\
      --config.data.tfds_dir=/tmp/rvlm_tfds --config.data.embedded.num_train=100000

Each parameter set (config.data.embedded, image/patch size, seed) is written under
its own sub-folder tfds_dir/<hash>, so a changed config can never read stale data.
Images are yielded as PNG bytes (encoding numpy arrays would need TensorFlow) and
decoded by pillow on read; text comes back as bytes.
"""
import hashlib
import io
import json
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from rvlm.data import embedded

NAME = "rvlm_embedded"
SPLITS = tuple(embedded.SPLIT_IDS)


def params(config) -> dict:
  """The JSON-able parameters that determine the data (and its folder)."""
  return dict(embedded=config.data.embedded.to_dict(),
              image_size=int(config.model.vit.image_size),
              patch_size=int(config.model.vit.patch_size), seed=int(config.seed))


def data_dir(config) -> str:
  if not config.data.tfds_dir:
    raise ValueError("config.data.tfds_dir must name a folder for embedded_tfds")
  blob = json.dumps(params(config), sort_keys=True, default=list).encode()
  return os.path.join(config.data.tfds_dir, hashlib.sha1(blob).hexdigest()[:12])


def _source(p, split):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return embedded.EmbeddedSource(
      ml_collections.ConfigDict(p["embedded"]), image_size=p["image_size"],
      patch_size=p["patch_size"], seed=p["seed"], split=split)


class RvlmEmbedded(tfds.core.GeneratorBasedBuilder):
  """Embedded multi-hop visual QA, rendered from (seed, split, i)."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds looks beside the class for download checksums; this builder downloads
    # nothing, and the lookup needs the `importlib_resources` backport for editable
    # installs, which Python >= 3.9 does not pull in.
    return None

  def __init__(self, *, params=None, **kwargs):  # pylint: disable=redefined-outer-name
    # Only building needs params; reading restores everything from the folder.
    self._params = params
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        # Keep example i at position i, so the files match EmbeddedSource[i].
        disable_shuffling=True,
        features=tfds.features.FeaturesDict(dict(
            image=tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            question=tfds.features.Text(),
            answer=tfds.features.Text(),
            family=tfds.features.Scalar(np.int32),
            hops=tfds.features.Scalar(np.int32),
            index=tfds.features.Scalar(np.int64),
        )),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._params is None:
      raise ValueError("RvlmEmbedded needs params=... to build")
    return {s: self._generate_examples(s) for s in SPLITS}

  def _generate_examples(self, split):
    src = _source(self._params, split)
    for i in range(len(src)):
      rec = src[i]
      buf = io.BytesIO()
      Image.fromarray(rec["image"]).save(buf, format="PNG")
      (q, a), = rec["turns"]
      yield i, dict(image=buf.getvalue(), question=q, answer=a,
                    family=rec["family"], hops=rec["hops"], index=i)


def build(config) -> str:
  """Builds (if absent) the array_record files for `config`; returns their folder."""
  d = data_dir(config)
  RvlmEmbedded(params=params(config), data_dir=d).download_and_prepare(
      file_format="array_record")
  return d


class TfdsSource:
  """Random access over a built split, yielding the same records as EmbeddedSource."""

  def __init__(self, config, split):
    if split not in SPLITS:
      raise ValueError(f"embedded_tfds split {split!r} unknown; choose from {SPLITS}")
    d = data_dir(config)
    if not os.path.isdir(os.path.join(d, NAME)):
      raise ValueError(
          f"no built embedded_tfds data for this config in {d}; build it with "
          f"python -m rvlm.data.tfds_embedded --config=... "
          f"--config.data.tfds_dir={config.data.tfds_dir}")
    self._dir, self._split = d, split
    self._ds = None

  def _data(self):
    if self._ds is None:
      self._ds = tfds.data_source(NAME, split=self._split, data_dir=self._dir,
                                  builder_kwargs=dict(file_format="array_record"))
    return self._ds

  def __len__(self):
    return len(self._data())

  def __getitem__(self, i):
    ex = self._data()[int(i)]
    if int(ex["index"]) != int(i):
      raise ValueError(f"{self._dir}/{self._split}: position {i} holds example "
                       f"{int(ex['index'])}; rebuild the data")
    return dict(image=np.asarray(ex["image"], np.uint8),
                turns=((ex["question"].decode(), ex["answer"].decode()),),
                family=int(ex["family"]), hops=int(ex["hops"]),
                origin=f"{self._dir}/{self._split}[{int(i)}]")

  def __getstate__(self):
    # The array_record readers hold file handles: workers reopen them.
    return dict(_dir=self._dir, _split=self._split, _ds=None)


def main(argv):
  del argv
  print(build(_CONFIG.value))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file("config", None, "config file",
                                            lock_config=True)
  app.run(main)
