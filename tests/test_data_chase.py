"""The chase family (pointer chasing) and the hop-count curriculum.

The solver here reads the rendered image, not the scene rows: it recovers every node's
colour and pointer from the pixels, so generation and rendering are checked together.
"""
import collections
import copy
import json
import os
import shutil

from flax import linen as nn
import jax
import numpy as np
import pytest

from configs import debug
from rvlm import checkpointing
from rvlm import data
from rvlm import train
from rvlm.models import vlm
from rvlm.data import chase
from rvlm.data import curriculum
from rvlm.data import embedded
from rvlm.data import pipeline


def chase_config(**embedded_overrides):
  c = debug.get_config()          # image 32, patch 8: a 4x4 grid
  c.data.embedded.update(families="chase", max_hops=4, eval_max_hops=6, chase_chains=3)
  c.data.embedded.update(embedded_overrides)
  c.data.seq_len = 10
  c.eval.update(splits=("test",), num_examples=32)
  return c


def source(c, split="train", stream=0):
  return embedded.EmbeddedSource(c.data.embedded, image_size=c.model.vit.image_size,
                                 patch_size=c.model.vit.patch_size, seed=c.seed,
                                 split=split, stream=stream)


def read_image(image, grid):
  """[(cell, own colour, target colour)] recovered from the pixels alone."""
  cell = image.shape[0] // grid
  rgb = {v: k for k, (_, v) in enumerate(chase.PALETTE)}
  nodes = []
  for r in range(grid):
    for c in range(grid):
      patch = image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
      if (patch == chase.BACKGROUND).all():
        continue                         # an empty cell shows the background only
      ring, core = tuple(patch[0, 0]), tuple(patch[cell // 2, cell // 2])
      ring_px = np.ones((cell, cell), bool)
      ring_px[cell // 4:cell - cell // 4, cell // 4:cell - cell // 4] = False
      assert (patch[ring_px] == ring).all() and (patch[~ring_px] == core).all(), (r, c)
      nodes.append((r * grid + c, rgb[ring], rgb[core]))
  return nodes


def solve_from_pixels(image, question, grid):
  """(answer, pointers followed to reach a fixed point, nodes) from the image."""
  nodes = read_image(image, grid)
  points_to = {own: target for _, own, target in nodes}
  node, steps = chase.NAMES.index(question.split()[3]), 0
  while points_to[node] != node:
    node, steps = points_to[node], steps + 1
  return chase.NAMES[node], steps, nodes


@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_hops_and_chains_match_a_solver_that_reads_the_pixels(split):
  c = chase_config()
  src = source(c, split)
  for i in range(300):
    rec = src[i]
    (q, a), = rec["turns"]
    answer, steps, nodes = solve_from_pixels(rec["image"], q, src.spec.grid)
    assert (answer, steps) == (a, rec["hops"]), (i, q)
    assert chase.solve(rec["scene"], q) == a
    # Every node has its own colour; every chain has exactly h hops: (h + 1) nodes per
    # end, and each end (a fixed point) is reached from exactly one start.
    owns = [own for _, own, _ in nodes]
    assert len(owns) == len(set(owns)) == len({cell for cell, _, _ in nodes})
    ends = [own for _, own, target in nodes if own == target]
    assert len(nodes) == len(ends) * (rec["hops"] + 1)
    assert len(ends) == chase.num_chains(src.spec, rec["hops"]) >= 2
    pointed = {target for _, own, target in nodes if own != target}
    starts = [own for own in owns if own not in pointed]
    assert len(starts) == len(ends) and chase.NAMES.index(q.split()[3]) in starts


def test_extra_hops_keep_the_answer_and_no_shortcut_finds_it():
  """Ends are fixed points; neither the nearest end nor the first end row answers."""
  c = chase_config(max_hops=5)
  src = source(c, "train")
  nearest = first_row = n = 0
  for i in range(600):
    scene, q, a, _, hops = src.text(i)
    rows = scene.tolist()
    points_to = {r[0]: r[5] for r in rows}
    start = [r for r in rows if chase.NAMES[r[0]] == q.split()[3]][0]
    node = start[0]
    for _ in range(hops):
      node = points_to[node]
    assert chase.NAMES[node] == a
    for _ in range(10):                    # following further changes nothing
      assert points_to[node] == node
    ends = [r for r in rows if r[0] == r[5]]
    dist = [abs(r[3] - start[3]) + abs(r[4] - start[4]) for r in ends]
    nearest += chase.NAMES[ends[int(np.argmin(dist))][0]] == a
    first_row += chase.NAMES[ends[0][0]] == a
    n += 1 / len(ends)
  # Both heuristics score chance (1/C on average): within 6 sampling std devs.
  for hits in (nearest, first_row):
    assert abs(hits - n) < 6 * np.sqrt(n), (hits, n)


def test_hop_ranges_per_split_and_focus():
  c = chase_config(max_hops=4, eval_max_hops=6, hop_focus=0.5)
  train_hops = collections.Counter(source(c, "train").text(i)[4] for i in range(800))
  assert set(train_hops) == {1, 2, 3, 4}
  assert 0.55 < train_hops[4] / 800 < 0.75        # 0.5 + 0.5 / 4 expected
  test_hops = collections.Counter(source(c, "test").text(i)[4] for i in range(600))
  assert set(test_hops) == {1, 2, 3, 4, 5, 6}
  assert max(test_hops.values()) < 1.6 * min(test_hops.values())   # uniform
  # Another stream is another set of examples, the same distribution.
  a = [source(c, "train").text(i)[1:3] for i in range(50)]
  b = [source(c, "train", stream=3).text(i)[1:3] for i in range(50)]
  assert a != b


def test_plain_streams_of_other_families_are_unchanged_by_the_new_fields():
  c = chase_config()
  c.data.embedded.families = "pointer,lookup"
  c.data.embedded.max_hops = 3
  before = [source(c).text(i)[1:] for i in range(20)]
  c.data.embedded.hop_focus = 0.0
  c.data.embedded.eval_max_hops = 0
  assert [source(c).text(i)[1:] for i in range(20)] == before


@pytest.mark.parametrize("field,value,match", [
    ("max_hops", 8, "max_hops"),             # a 4x4 grid fits two chains of <= 7 hops
    ("chase_colours", 27, "chase_colours"),
    ("eval_max_hops", 9, "eval_max_hops"),
    ("chase_chains", 1, "chase_chains"),
    ("hop_focus", 1.5, "hop_focus"),
])
def test_bad_chase_config_is_a_value_error_naming_the_field(field, value, match):
  c = chase_config()
  c.data.embedded[field] = value
  with pytest.raises(ValueError, match=match):
    pipeline.validate(c)


def test_patch_must_hold_a_ring_and_a_core():
  c = chase_config()
  c.model.vit.update(image_size=30, patch_size=3)
  c.data.embedded.max_hops = 3
  with pytest.raises(ValueError, match="patch_size=3"):
    pipeline.validate(c)


def test_test_comp_refuses_a_chase_only_mix():
  c = chase_config()
  with pytest.raises(ValueError, match="test_comp"):
    source(c, "test_comp")


# ---- curriculum -------------------------------------------------------------------

def curriculum_config(**cur):
  c = chase_config(max_hops=5, hop_focus=0.5)
  c.data.curriculum.update(enabled=True, start=2, threshold=0.9, every=2, num_examples=16)
  c.data.curriculum.update(cur)
  return c


def test_curriculum_levels_rise_only_past_the_threshold():
  it = data.build_train_iterator(curriculum_config())
  assert isinstance(it, curriculum.CurriculumIterator) and it.level == 2
  assert max(next(it)["hops"]) <= 2
  assert not it.update(0.89) and it.level == 2
  assert it.update(0.9) and it.level == 3
  batches = [next(it) for _ in range(4)]
  hops = np.concatenate([b["hops"] for b in batches])
  assert hops.max() == 3 and (hops == 3).mean() > 0.5
  probe = it.probe_batches(8)
  assert {int(h) for b in probe for h, m in zip(b["hops"], b["example_mask"]) if m} == {3}
  for _ in range(5):
    it.update(1.0)
  assert it.level == 5 and not it.due(2)          # the top level is final
  it.close()


def test_curriculum_state_resumes_the_same_batches():
  c = curriculum_config()
  it = data.build_train_iterator(c)
  next(it)
  it.update(1.0)
  next(it)
  state = copy.deepcopy(it.get_state())
  expected = [next(it) for _ in range(3)]
  other = data.build_train_iterator(c)
  other.set_state(state)
  assert other.level == 3
  for want in expected:
    got = next(other)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  plain = pipeline.build_train_iterator(chase_config())
  with pytest.raises(ValueError, match="curriculum"):
    other.set_state(plain.get_state())


@pytest.mark.parametrize("field,value", [("start", 0), ("start", 6), ("threshold", 1.5),
                                         ("every", 0)])
def test_bad_curriculum_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"curriculum.{field}"):
    curriculum.check_config(curriculum_config(**{field: value}))


def _final_params(c, workdir):
  model = vlm.make_model(c.model)
  abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                     train.dummy_batch(c, 1))["params"])
  return jax.tree.map(np.asarray, checkpointing.load_params(workdir, abstract))


def _logged(workdir):
  """{step: {loss and curriculum scalars}}; a resumed run's rows update earlier ones."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      rows.setdefault(row["step"], {}).update(
          {k: v for k, v in row.items() if k.startswith(("loss", "curriculum"))})
  return rows


def test_trainer_resume_across_level_changes_is_exact(tmp_path):
  """Levels rise at steps 2, 4 and 6 (threshold 0); resuming from the step-4 checkpoint
  gives the same parameters, levels and logged losses as the uninterrupted run."""
  c = curriculum_config(threshold=0.0)
  c.train.update(total_steps=8, log_every=2, checkpoint_every=4, eval_every=1000,
                 keep_checkpoints=3)
  c.eval.max_depth = 4                 # R = 2: depths 3 and 4 are extrapolation
  full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
  train.train_and_evaluate(c, full)
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(resumed), "8"))
  os.remove(os.path.join(resumed, "results.json"))
  train.train_and_evaluate(c, resumed)

  full_log, resumed_log = _logged(full), _logged(resumed)
  assert [full_log[s]["curriculum/level"] for s in (2, 4, 6)] == [3.0, 4.0, 5.0]
  assert "curriculum/level" not in full_log[8]     # level 5 is the top: no more checks
  for s in (6, 8):
    assert full_log[s] == resumed_log[s]
  a, b = _final_params(c, full), _final_params(c, resumed)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  with open(os.path.join(full, "results.json")) as f:
    results = json.load(f)
  assert set(results["accuracy_by_depth"]) == {"1", "2", "3", "4"}
  assert set(results["flips_to_wrong_by_depth"]) == {"2", "3", "4"}
  acc, flips = results["accuracy_by_depth"], results["flips_to_wrong_by_depth"]
  for r in (2, 3, 4):   # a step loses at most what it flips to wrong
    assert 0 <= flips[str(r)] <= acc[str(r - 1)] + 1e-9
    assert acc[str(r)] >= acc[str(r - 1)] - flips[str(r)] - 1e-9
  for h, by_depth in results["by_hops"].items():
    assert 1 <= int(h) <= 6 and set(by_depth) == {"1", "2", "3", "4"}


@pytest.mark.parametrize("mode,steps,max_depth", [("connector", 3, 2), ("none", 1, 3)])
def test_eval_depth_below_r_or_beyond_a_standard_model_is_refused(mode, steps, max_depth):
  c = debug.get_config()
  c.model.recursion.update(mode=mode, num_steps=steps)
  c.eval.max_depth = max_depth
  with pytest.raises(ValueError, match="config.eval.max_depth"):
    train.check_config(c)


def test_decoys_are_lone_fixed_points_that_hide_which_square_is_an_end():
  c = chase_config(max_hops=3, eval_max_hops=3, chase_colours=8, chase_chains=2,
                   chase_decoys=4)
  src = source(c)
  for i in range(200):
    rec = src[i]
    (q, a), = rec["turns"]
    answer, steps, nodes = solve_from_pixels(rec["image"], q, src.spec.grid)
    assert (answer, steps) == (a, rec["hops"])
    plain = [own for _, own, target in nodes if own == target]
    chain_nodes = 2 * (rec["hops"] + 1)
    assert len(plain) == 2 + min(4, 8 - chain_nodes)   # ends + decoys
    assert len(nodes) == chain_nodes + len(plain) - 2
    pointed = {target for _, own, target in nodes if own != target}
    assert sum(p in pointed for p in plain) == 2         # only the two ends are reached
