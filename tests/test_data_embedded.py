"""Embedded dataset: determinism, correctness, balance, splits, config checks."""
import collections
import hashlib
import subprocess
import sys

import numpy as np
import pytest

from configs import multihop  # the full family mix
from rvlm.data import embedded
from rvlm.data import families
from rvlm.data import pipeline
from rvlm.data import scenes

ROOT = __file__.rsplit("/tests/", 1)[0]


def _source(split="train", config=None, **overrides):
  c = config or multihop.get_config()
  for k, v in overrides.items():
    c.data.embedded[k] = v
  return embedded.EmbeddedSource(
      c.data.embedded, image_size=c.model.vit.image_size,
      patch_size=c.model.vit.patch_size, seed=c.seed, split=split)


def _digest(split, indices):
  src = _source(split)
  h = hashlib.sha256()
  for i in indices:
    rec = src[i]
    h.update(rec["image"].tobytes())
    h.update(repr(rec["turns"]).encode())
  return h.hexdigest()


def test_same_seed_and_index_give_identical_bytes_in_another_process():
  idx = [0, 7, 12345, 999_999]
  code = ("import sys; sys.path.insert(0, %r); "
          "from tests.test_data_embedded import _digest; "
          "print(_digest('train', %r), _digest('test_comp', [0, 3]))" % (ROOT, idx))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=ROOT).stdout.split()
  assert out == [_digest("train", idx), _digest("test_comp", [0, 3])]
  # And the global numpy RNG is neither used nor disturbed.
  np.random.seed(1)
  a = _source()[5]
  np.random.seed(2)
  b = _source()[5]
  assert np.array_equal(a["image"], b["image"]) and a["turns"] == b["turns"]


# ---- an independent solver: answers every family from the scene array ----------

_DIRS = {"above": (-1, 0), "below": (1, 0), "left": (0, -1), "right": (0, 1)}


def _solve(scene, question):
  """Recomputes the answer from the scene rows, parsing the question text."""
  by_colour = {scenes.COLOUR_NAMES[r[0]]: r for r in scene.tolist()}
  at = {(r[3], r[4]): r for r in scene.tolist()}
  words = question.split()
  if question.startswith("what shape is the"):
    return scenes.SHAPES[by_colour[words[4]][1]]
  if question.startswith("what colour is"):
    rels = [w for w in words if w in _DIRS]
    row = by_colour[words[-3]]
    for rel in reversed(rels):       # the innermost relation applies first
      dr, dc = _DIRS[rel]
      row = at[(row[3] + dr, row[4] + dc)]
    return scenes.COLOUR_NAMES[row[0]]
  if question.startswith("is the "):
    return "yes" if by_colour[words[2]][1] == by_colour[words[9]][1] else "no"
  if question.startswith("how many") or question.startswith("is there"):
    size = scenes.SIZES.index(words[2] if words[0] == "how" else words[3])
    shape_word = words[3] if words[0] == "how" else words[4]
    shape = [s for s, name in enumerate(scenes.SHAPES) if shape_word.startswith(name)][0]
    n = sum(1 for r in scene.tolist() if r[1] == shape and r[2] == size)
    return str(n) if words[0] == "how" else ("yes" if n else "no")
  if question.startswith("start at the"):
    row, hops = by_colour[words[3]], int(words[7])
    for _ in range(hops):
      dr, dc = scenes.MOVES[row[5]]
      row = at[(row[3] + dr, row[4] + dc)]
    return scenes.COLOUR_NAMES[row[0]]
  raise AssertionError(question)


@pytest.mark.parametrize("split", ["train", "test_comp"])
def test_every_answer_matches_an_independent_solver(split):
  src = _source(split)
  seen = collections.Counter()
  for i in range(1500):
    scene, q, a, fam, hops = src.text(i)
    assert _solve(scene, q) == a, (i, q, a, scene)
    # Scenes are well formed: unique colours and cells, one object per cell.
    assert len(set(scene[:, 0])) == len(scene)
    assert len({(r, c) for r, c in scene[:, 3:5].tolist()}) == len(scene)
    assert scene[:, 3:5].min() >= 0 and scene[:, 3:5].max() < 4
    name = families.ALL_FAMILIES[fam]
    expected_hops = {"lookup": 1, "relate": 1, "chain2": 2, "chain3": 3, "compare": 2,
                     "count": 1, "exist": 1}.get(name)
    assert hops == (expected_hops if expected_hops else int(q.split()[7]))
    seen[name] += 1
  mix = set(multihop.get_config().data.embedded.families.split(","))
  expected = mix - (set(embedded.NO_SHAPES) if split == "test_comp" else set())
  assert set(seen) == expected


# Balance bound, stated: with the answer drawn first, every answer's share within a
# family is 1/k in expectation; over 160*k examples per family each share must lie
# within 1/k +- 0.35/k (more than 4 standard deviations of the sampling noise).
def test_answers_balanced_within_each_family():
  spec = embedded.make_spec(multihop.get_config().data.embedded, 32, 8, comp=False)
  for name in families.FAMILIES:
    answers = families.answer_set(name, spec)
    k = len(answers)
    n = 160 * k
    counts = collections.Counter(
        families.generate(name, np.random.default_rng([11, j]), spec)[2]
        for j in range(n))
    assert set(counts) == set(answers), name
    for a in answers:
      assert abs(counts[a] / n - 1 / k) <= 0.35 / k, (name, a, counts)


def _pairs(scene):
  return {(c, s) for c, s in scene[:, :2].tolist() if s != scenes.ARROW}


def test_compositional_split_holds_out_colour_shape_pairs():
  c = multihop.get_config()
  heldout = {(scenes.COLOUR_NAMES.index(p.split()[0]), scenes.SHAPES.index(p.split()[1]))
             for p in c.data.embedded.heldout_pairs.split(",")}
  for split in ("train", "val", "test"):
    src = _source(split)
    for i in range(2000):
      assert not _pairs(src.text(i)[0]) & heldout, (split, i)
  comp = _source("test_comp")
  named = 0
  for i in range(500):
    scene, q, *_ = comp.text(i)
    assert _pairs(scene) & heldout, i
    # Where the question names an object by colour, that object is a held-out pair.
    colour = [w for w in q.split() if w in scenes.COLOUR_NAMES]
    if colour and not q.startswith("what colour"):
      row = [r for r in scene.tolist() if scenes.COLOUR_NAMES[r[0]] == colour[0]][0]
      assert (row[0], row[1]) in heldout
      named += 1
  assert named > 100


def test_splits_use_disjoint_seed_streams():
  keys = {}
  for split in ("train", "val", "test"):
    src = _source(split)
    keys[split] = {src[i]["image"].tobytes() + src[i]["turns"][0][0].encode()
                   for i in range(300)}
  assert not keys["train"] & keys["val"]
  assert not keys["train"] & keys["test"]
  assert not keys["val"] & keys["test"]


def test_grid_follows_the_model_image_and_patch_size():
  c = multihop.get_config()
  c.model.vit.image_size, c.model.vit.patch_size = 48, 8
  rec = _source(config=c, max_hops=5)[3]
  assert rec["image"].shape == (48, 48, 3)
  src = _source(config=c, families="pointer", max_hops=5)
  hops = {src.text(i)[4] for i in range(200)}
  assert hops == {1, 2, 3, 4, 5}
  assert max(r[3] for i in range(50) for r in src.text(i)[0].tolist()) == 5
  c.model.vit.image_size = 36
  with pytest.raises(ValueError, match="image_size=36"):
    _source(config=c)


def test_render_places_each_object_inside_its_patch():
  scene = np.array([[0, 0, 1, 1, 2, -1], [2, 1, 0, 3, 0, -1]], np.int32)
  img = scenes.render(scene, 32, 4).astype(int)
  red = img[8:16, 16:24]
  assert (red == scenes.COLOURS[0][1]).all(-1).sum() == 49   # a large 7x7 square
  blue = (img[24:32, 0:8] == scenes.COLOURS[2][1]).all(-1)
  assert 0 < blue.sum() < 25                                  # a small circle
  img[8:16, 16:24] = 0
  img[24:32, 0:8] = 0
  assert not img.any()                                        # nothing else drawn


@pytest.mark.parametrize("field,value,match", [
    ("families", "lookup,teleport", "unknown family 'teleport'"),
    ("max_hops", 0, "max_hops"),
    ("heldout_pairs", "red blob", "heldout_pairs"),
    ("family_weights", "1,2", "family_weights"),
    ("max_count", 7, "max_count"),
])
def test_bad_embedded_config_is_a_value_error_naming_the_field(field, value, match):
  c = multihop.get_config()
  c.data.embedded[field] = value
  with pytest.raises(ValueError, match=match):
    pipeline.validate(c)


def test_seq_len_too_short_is_reported_up_front():
  c = multihop.get_config()
  c.data.seq_len = 16
  with pytest.raises(ValueError, match="config.data.seq_len=16"):
    pipeline.validate(c)
  c.data.seq_len = 32
  c.data.embedded.max_hops = 7
  pipeline.validate(c)  # longest question still fits


@pytest.mark.parametrize("family", families.FAMILIES)
def test_question_length_bound_holds_per_family(family):
  # The up-front seq_len check trusts this bound, so a question longer than it
  # would make every example of the family be skipped at run time.
  src = _source(families=family, max_hops=4)
  longest = max(len(src[i]["turns"][0][0].split()) for i in range(300))
  assert longest <= families.max_question_words(src.spec, (family,))


def test_seq_len_check_uses_only_the_enabled_families():
  c = multihop.get_config()
  c.data.embedded.families = "lookup"
  c.data.seq_len = 10
  pipeline.validate(c)  # "what shape is the red object ?" + bos/answer/eos
  c.data.seq_len = 9
  with pytest.raises(ValueError, match="need 10"):
    pipeline.validate(c)
