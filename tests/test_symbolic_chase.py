"""The symbolic chain-end test-bed (rvlm/experiments/symbolic_chase.py)."""
import jax
import numpy as np
import pytest

from rvlm.experiments import symbolic_chase as sc


def test_batches_are_chains_that_end_at_fixed_points():
  ex = sc.make_batch(np.random.default_rng(0), 200, 6, 16, 2, focus=0.3)
  assert ex["cid"].shape == ex["cptr"].shape == (200, 16)
  for i in range(200):
    assert sorted(ex["cid"][i].tolist()) == list(range(16))      # every id once
    assert sc.follow(ex, i) == ex["answer"][i]
    succ = dict(zip(ex["cid"][i].tolist(), ex["cptr"][i].tolist()))
    node, hops = int(ex["start"][i]), 0
    while succ[node] != node:
      node, hops = succ[node], hops + 1
    assert hops == ex["hops"][i]
    # every fixed point but (at most) one lone cell has a predecessor: ends are not
    # told apart by having one
    ends = [c for c, t in succ.items() if c == t]
    with_pred = [c for c in ends if any(t == c and s != c for s, t in succ.items())]
    assert len(ends) - len(with_pred) <= 1
  assert np.all(ex["hops"] >= 1) and np.all(ex["hops"] <= 6)
  assert (ex["hops"] == 6).mean() > 0.3                          # focus at the top level
  # answers spread over the ids (balanced by symmetry)
  assert len(set(ex["answer"].tolist())) >= 14


def test_make_batch_rejects_hops_that_do_not_fit():
  with pytest.raises(ValueError, match="do not fit"):
    sc.make_batch(np.random.default_rng(0), 4, 8, 8, 2)


def test_recursion_never_duplicates_params():
  ex = jax.tree.map(np.asarray, sc.make_batch(np.random.default_rng(0), 2, 1, 8, 2))
  count = lambda m: sum(x.size for x in jax.tree.leaves(m.init(jax.random.PRNGKey(0), ex)))
  one, four = (sc.build_model("rvlm", 8, 16, 1, r, 0.1) for r in (1, 4))
  assert count(one) == count(four)
  assert four.apply(four.init(jax.random.PRNGKey(0), ex), ex).shape == (4, 2, 8)
  deep = sc.build_model("standard_deep", 8, 16, 1, 4, 0.1)
  assert deep.depth == 4 and deep.loops == 1
  with pytest.raises(ValueError, match="unknown"):
    sc.build_model("looped", 8, 16, 1, 4, 0.1)


def test_a_short_run_learns_the_one_hop_lookup():
  r = sc.train_and_evaluate("standard", depth=1, cells=8, chains=2, max_hops=2, steps=300,
                            width=32, lr=3e-3, test_examples=256, log=lambda s: None)
  acc = r["accuracy_by_hops_and_depth"]
  assert sorted(acc) == list(range(1, 8)) and all(len(v) == 1 for v in acc.values())
  # chance given the ends is about 1/4 (8 cells: 2 chains' ends and pairs' ends)
  assert acc[1][0] > 0.6, acc          # 0.81 when written (300 steps)
  assert r["accuracy_at_2x_loops"] is None and r["connector_alpha_mean_abs"] is None


def test_study_file_resumes_and_tables(tmp_path):
  calls = []

  def fake(model, seed):
    calls.append((model, seed))
    loops = 1 if model == "standard" else 4
    acc = {h: [0.5] * loops for h in range(1, 13)}
    return dict(model=model, depth=1, loops=4, layers=1, steps=2000, seed=seed,
                trained_depth=loops, h90=seed, accuracy_by_hops_and_depth=acc)

  out = str(tmp_path / "s.jsonl")
  setting = dict(depth=1, loops=4, steps=2000)
  sc.run_study(out, ["standard", "rvlm"], [0, 1], setting, fake)
  assert sorted(calls) == [("rvlm", 0), ("rvlm", 1), ("standard", 0), ("standard", 1)]
  text = sc.run_study(out, ["standard", "rvlm"], [0, 1], setting, fake)
  assert len(calls) == 4                        # everything is in the file: nothing reruns
  sc.run_study(out, ["rvlm"], [0], dict(setting, steps=4000), fake)
  assert len(calls) == 5                        # another setting is another run
  assert "| standard | 1 | 1 | 2000 | 2 | 0.50 (0.71) | 0.50 (0.00)" in text
  assert "| rvlm | 1 | 4 | 2000 | 2 |" in text
  with pytest.raises(ValueError, match="unknown"):
    sc.run_study(out, ["looped"], [0], setting, fake)
