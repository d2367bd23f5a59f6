"""tfds builder: array_record files read back equal the embedded source and batches."""
import subprocess
import sys

import numpy as np
import pytest

from configs import multihop  # the full family mix
from rvlm import data
from rvlm.data import pipeline
from rvlm.data import tfds_embedded

ROOT = __file__.rsplit("/tests/", 1)[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  c = multihop.get_config()
  c.data.tfds_dir = str(tmp_path_factory.mktemp("tfds"))
  c.data.embedded.update(dict(num_train=48, num_val=16, num_test=16))
  tfds_embedded.build(c)
  return c


def test_round_trip_equals_the_embedded_source(built):
  for split in ("train", "val", "test_comp"):
    want = pipeline.source(built, "embedded", split)
    got = pipeline.source(built, "embedded_tfds", split)
    assert len(got) == len(want)
    for i in range(len(want)):
      a, b = got[i], want[i]
      assert np.array_equal(a["image"], b["image"]) and a["image"].dtype == np.uint8
      assert (a["turns"], a["family"], a["hops"]) == (b["turns"], b["family"], b["hops"])


def test_embedded_tfds_batches_equal_embedded_batches(built):
  c = built.copy_and_resolve_references()
  c.data.batch_size = 16
  its = []
  for name in ("embedded", "embedded_tfds"):
    c.data.name = name
    its.append(data.build_train_iterator(c))
  for _ in range(4):   # past the end of the first epoch
    x, y = next(its[0]), next(its[1])
    assert all(np.array_equal(x[k], y[k]) for k in x)
  for it in its:
    it.close()
  c.data.name = "embedded_tfds"
  evb = data.build_eval_batches(c, "val", 8, 16)
  assert len(evb) == 2 and evb[1]["example_mask"].all()


def test_read_back_in_a_fresh_process(built):
  code = ("import sys; sys.path.insert(0, %r); import numpy as np; "
          "from rvlm.data import tfds_embedded; from configs import multihop; "
          "c = multihop.get_config(); c.data.tfds_dir = %r; "
          "c.data.embedded.update(dict(num_train=48, num_val=16, num_test=16)); "
          "r = tfds_embedded.TfdsSource(c, 'test')[5]; "
          "print(int(r['image'].astype(np.int64).sum()), r['turns'][0][0])"
          % (ROOT, built.data.tfds_dir))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=ROOT).stdout.strip()
  want = pipeline.source(built, "embedded", "test")[5]
  assert out == f"{int(want['image'].astype(np.int64).sum())} {want['turns'][0][0]}"


def test_a_changed_config_is_not_silently_read(built):
  c = built.copy_and_resolve_references()
  c.data.embedded.max_hops = 2
  with pytest.raises(ValueError, match="no built embedded_tfds data"):
    pipeline.source(c, "embedded_tfds", "train")
