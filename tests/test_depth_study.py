"""The depth study: its variant configs, h90, the claims and the runner end to end."""
import json
import os

import numpy as np
import pytest
from flax import traverse_util

from configs import chase
from configs.experiments import depth as depth_configs
from rvlm import train
from rvlm.experiments import depth
from rvlm.experiments import paper
from rvlm.experiments import report

CHASE = chase.get_config()
R, D = CHASE.model.recursion.num_steps, CHASE.model.decoder.depth


def _flat(c):
  return traverse_util.flatten_dict(c.to_dict(), sep=".")


# ---- configs -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(depth_configs.VARIANTS))
def test_every_variant_builds_and_validates(variant):
  c = depth_configs.get_config(f"variant={variant}")
  train.check_config(c)
  assert c.train.total_steps % c.train.eval_every == 0  # evaluated once, at the end
  assert c.data.curriculum.to_dict() == CHASE.data.curriculum.to_dict()


def test_variants_differ_only_where_stated():
  n = 1000  # large enough that no warmup or checkpoint interval is clipped
  cfg = lambda v: _flat(depth_configs.get_config(f"variant={v},steps={n}"))  # noqa: E731
  rvlm = cfg("rvlm")
  diff = lambda a, b: {k for k in a if a[k] != b[k]}  # noqa: E731
  # rvlm is chase itself (model, data, curriculum, loss), evaluated to 2R.
  base = _flat(CHASE)
  assert {k for k in diff(rvlm, base) if not k.startswith("train.")} == set()
  assert rvlm["eval.max_depth"] == 2 * R and rvlm["train.total_steps"] == n
  assert rvlm["model.recursion.mode"] == "connector" and rvlm["loss.kind"] == "monotonic"
  for name, spec in depth_configs.VARIANTS.items():
    if spec.mode == "rvlm":
      assert diff(cfg(name), rvlm) == {f for f, _ in spec.overrides}, name
  assert cfg("rvlm_beta1")["loss.beta"] == 1.0
  assert cfg("rvlm_final_only")["loss.kind"] == "final_only"
  assert cfg("rvlm_base_none")["model.connector.base"] == "none"
  van = cfg("vanilla")
  assert diff(van, rvlm) == {"model.recursion.mode", "loss.kind"}
  assert van["loss.kind"] == "final_only" and van["model.recursion.num_steps"] == R
  std = cfg("standard")
  assert diff(std, rvlm) == {"model.recursion.mode", "model.recursion.num_steps",
                             "eval.max_depth"}
  assert (std["model.recursion.mode"], std["model.recursion.num_steps"],
          std["eval.max_depth"]) == ("none", 1, 0)
  iso = cfg("standard_iso_flops")
  assert diff(iso, std) == {"train.total_steps", "train.eval_every"}
  assert iso["train.total_steps"] == R * n
  deep = cfg("standard_deep")
  assert diff(deep, std) == {"model.decoder.depth"} and deep["model.decoder.depth"] == R * D


def test_arguments_steps_seed_and_errors():
  assert depth_configs.STEPS == CHASE.train.total_steps
  assert depth_configs.get_config().train.total_steps == CHASE.train.total_steps
  assert depth_configs.get_config("variant=rvlm,seed=2").seed == 2
  with pytest.raises(ValueError, match="unknown variant 'rvlm_nope'"):
    depth_configs.get_config("variant=rvlm_nope")
  with pytest.raises(ValueError, match="unknown argument 'size'"):
    depth_configs.get_config("size=3")
  with pytest.raises(ValueError, match="unknown variant 'bogus'"):
    depth.check_variants(["rvlm", "bogus"])
  assert depth.check_variants(["rvlm", "standard", "rvlm"]) == ["rvlm", "standard"]
  with pytest.raises(ValueError, match="none given"):
    depth.check_variants([])


# ---- h90 and claims on hand-made results ---------------------------------------------


def test_h90():
  at = lambda accs, r="1": {str(h): {r: a} for h, a in enumerate(accs, 1)}  # noqa: E731
  assert depth.h90(at([0.95, 0.92, 0.85, 0.99]), 1) == 2   # a later pass does not count
  assert depth.h90(at([0.89, 0.99]), 1) == 0               # h = 1 fails
  assert depth.h90(at([0.9, 0.9, 0.91]), 1) == 3           # 0.9 passes; every h passes
  gap = at([0.99, 0.99, 0.99, 0.99])
  del gap["3"]
  assert depth.h90(gap, 1) == 2                            # a missing h ends the run
  by_r = {"1": {"1": 0.95, "4": 0.99}, "2": {"1": 0.3, "4": 0.97}, "3": {"1": 0.1, "4": 0.5}}
  assert depth.h90(by_r, 1) == 1 and depth.h90(by_r, 4) == 2


def _record(by_hops):
  """A results.json record from {h: [accuracy at r = 1, 2, ...]} (equal h shares)."""
  depths = len(next(iter(by_hops.values())))
  acc = {str(r + 1): float(np.mean([a[r] for a in by_hops.values()])) for r in range(depths)}
  split = {"accuracy_by_depth": acc, "loss_by_depth": acc, "input_norm_by_depth": acc,
           "hidden_norm_by_depth": acc, "cka_with_e0_by_depth": acc,
           "flips_to_wrong_by_depth": {d: 0.01 for d in acc if d != "1"},
           "by_family": {"chase": acc},
           "by_hops": {str(h): {str(r + 1): a for r, a in enumerate(v)}
                       for h, v in by_hops.items()},
           "majority_baseline": 0.2, "num_examples": 100}
  return {"results": {"splits": {"test": split, "val": split}},
          "info": {"wall_time_s": 1.0, "steps_per_sec": 1.0, "connector_alpha_final": None}}


def _variant(name, seeds, trained_depth):
  """variant_summary over hand-made seeds; trained depth set on the real config."""
  c = depth_configs.get_config(f"variant={name}")
  c.model.recursion.num_steps = trained_depth
  costs = {"param_count": 1, "train_flops_per_example": 10,
           "inference_flops_per_example_by_depth": {str(r): r for r in range(1, 9)}}
  return depth.variant_summary(name, c, [_record(s) for s in seeds], costs)


MAX_HOPS = 4  # trained h <= 4; test h up to 6


def _study():
  # standard (r = 1): h90 2 and 1 -> mean 1.5; hard hops h = 2, 3, 4.
  std = _variant("standard", [
      {1: [1.0], 2: [0.95], 3: [0.5], 4: [0.4], 5: [0.2], 6: [0.1]},
      {1: [1.0], 2: [0.85], 3: [0.5], 4: [0.4], 5: [0.2], 6: [0.1]}], 1)
  # rvlm (R = 2, evaluated to r = 4): h90 4 and 3 at r = 2.
  rvlm = _variant("rvlm", [
      {1: [1, 1, 1, 1], 2: [.8, 1, 1, 1], 3: [.5, .95, .95, .95], 4: [.4, .92, .92, .92],
       5: [.2, .6, .7, .8], 6: [.1, .4, .5, .6]},
      {1: [1, 1, 1, 1], 2: [.8, .96, .96, .96], 3: [.5, .93, .93, .93], 4: [.4, .86, .86, .86],
       5: [.2, .6, .6, .6], 6: [.1, .4, .4, .4]}], 2)
  # vanilla: 5 points below rvlm on h = 2..4 in both seeds (goal: 7 -> not met).
  van = _variant("vanilla", [
      {h: [a - 0.05 if 2 <= h <= 4 else a for a in accs] for h, accs in s.items()}
      for s in ({1: [1, 1, 1, 1], 2: [.8, 1, 1, 1], 3: [.5, .95, .95, .95],
                 4: [.4, .92, .92, .92], 5: [.2, .6, .7, .8], 6: [.1, .4, .5, .6]},
                {1: [1, 1, 1, 1], 2: [.8, .96, .96, .96], 3: [.5, .93, .93, .93],
                 4: [.4, .86, .86, .86], 5: [.2, .6, .6, .6], 6: [.1, .4, .4, .4]})], 2)
  return {"standard": std, "rvlm": rvlm, "vanilla": van}


def test_variant_summary_h90_and_flops():
  v = _study()
  assert v["standard"]["h90"]["values"] == [2, 1] and v["standard"]["h90"]["mean"] == 1.5
  assert v["rvlm"]["h90"]["values"] == [4, 3]
  assert v["rvlm"]["trained_depth"] == 2 and v["rvlm"]["evaluated_depth"] == 4
  assert v["rvlm"]["flops_per_example"] == {"train": 10, "inference": 2}
  assert v["rvlm"]["accuracy_by_hops_and_depth"]["5"]["4"]["mean"] == pytest.approx(0.7)
  assert v["rvlm"]["flips_to_wrong_by_depth"]["2"]["mean"] == pytest.approx(0.01)


def test_claims_numbers_and_not_met():
  v = _study()
  c = depth.claims(v, MAX_HOPS)
  a = c["a_h90_rvlm_at_least_2x_standard"]
  assert a["met"] is True and a["ratio"] == pytest.approx(3.5 / 1.5)
  b = c["b_hard_hops_rvlm_minus_standard"]
  assert b["hops"] == [2, 3, 4]
  # Per seed, mean over h = 2..4: rvlm (1 + .95 + .92)/3, (.96 + .93 + .86)/3;
  # standard (.95 + .5 + .4)/3, (.85 + .5 + .4)/3.
  diffs = 100 * np.array([(2.87 - 1.85) / 3, (2.75 - 1.75) / 3])
  assert b["diff_values_points"] == pytest.approx(diffs)
  assert b["margin_points"] == pytest.approx(diffs.mean())
  assert b["diff_std_points"] == pytest.approx(diffs.std(ddof=1))
  assert b["met"] is True and b["exceeds_2_std"] is True  # 33.3 vs 2 x 0.47
  bv = c["b_hard_hops_rvlm_minus_vanilla"]
  assert bv["margin_points"] == pytest.approx(5.0) and bv["met"] is False
  assert bv["diff_std_points"] == pytest.approx(0.0, abs=1e-9)
  for base in ("standard_iso_flops", "standard_deep"):
    assert c[f"b_hard_hops_rvlm_minus_{base}"] == {
        "status": "not run", "missing": [base], "met": None}
  mono = c["c_rvlm_monotone_in_depth"]
  assert mono["met"] is True and mono["non_decreasing_1_to_R"] is True
  # d: h = 5, 6 (never trained), r = 2 -> 4: seed 0 (.8 + .6 - .6 - .4)/2, seed 1 0.
  d = c["d_rvlm_gain_R_to_2R_beyond_trained_hops"]
  assert d["hops"] == [5, 6] and (d["from_depth"], d["to_depth"]) == (2, 4)
  assert d["gain_points"]["values"] == pytest.approx([20.0, 0.0])
  assert d["gain_by_hops_points"] == pytest.approx({"5": 10.0, "6": 10.0})
  assert d["met"] is True and d["exceeds_2_std"] is False
  # Standard solving every trained h: no hard hop counts, nothing to decide.
  v["standard"]["h90"]["mean"] = 4.0
  b = depth.claims(v, MAX_HOPS)["b_hard_hops_rvlm_minus_standard"]
  assert b["hops"] == [] and b["met"] is None
  assert depth.claims(v, MAX_HOPS)["a_h90_rvlm_at_least_2x_standard"]["met"] is False


def test_monotone_claim_tolerances():
  def check(accs):
    v = {"rvlm": {"trained_depth": 3,
                  "accuracy_by_depth": {str(r): {"mean": a} for r, a in enumerate(accs, 1)}}}
    return depth.claim_monotone(v)
  assert check([0.5, 0.7, 0.696, 0.70, 0.687, 0.70])["met"] is True   # -0.4, -0.9 points
  c = check([0.5, 0.7, 0.694, 0.70, 0.70, 0.70])                      # -0.6 within 1..R
  assert c["non_decreasing_1_to_R"] is False and c["met"] is False
  assert c["worst_step_change_points"] == pytest.approx(-0.6)
  c = check([0.5, 0.6, 0.7, 0.70, 0.688, 0.70])                       # 1.2 below r = R
  assert c["holds_R_plus_1_to_2R"] is False and c["met"] is False
  assert c["worst_drop_below_R_points"] == pytest.approx(1.2)
  c = check([0.5, 0.6, 0.7])                                          # not evaluated past R
  assert c["met"] is None and c["non_decreasing_1_to_R"] is True


def test_missing_variants_report_not_run():
  c = depth.claims({}, MAX_HOPS)
  assert set(c) == {"a_h90_rvlm_at_least_2x_standard", "c_rvlm_monotone_in_depth",
                    "d_rvlm_gain_R_to_2R_beyond_trained_hops"} | {
                        f"b_hard_hops_rvlm_minus_{b}" for b in depth.GOALS}
  assert all(x["status"] == "not run" and x["met"] is None for x in c.values())
  only = depth.claims({"rvlm": _study()["rvlm"]}, MAX_HOPS)
  assert only["a_h90_rvlm_at_least_2x_standard"]["missing"] == ["standard"]
  assert only["c_rvlm_monotone_in_depth"]["status"] == "measured"


# ---- the runner, end to end ----------------------------------------------------------

# The chase model on the tiny preset; the vocabulary must hold the chase words.
_TINY = (("model.vocab_size", 256), ("data.batch_size", 16), ("eval.num_examples", 48),
         ("eval.batch_size", 48))


def test_runner_writes_depth_json_matching_the_runs(tmp_path):
  out = str(tmp_path / "depth")
  summary = depth.run_study(out, variants=["standard", "rvlm"], seeds=1, steps_n=2,
                            preset="tiny", overrides=_TINY)
  with open(os.path.join(out, "depth.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  assert set(on_disk) == {"study", "claims", "standard", "rvlm"}
  study = on_disk["study"]
  assert study["seeds"] == 1 and study["steps_n"] == 2 and study["machine"]["cpu_count"]
  assert study["wall_time_s_this_invocation"] > 0
  assert study["trained_max_hops"] == CHASE.data.embedded.max_hops
  for name, trained in (("standard", 1), ("rvlm", R)):
    v = on_disk[name]
    with open(os.path.join(paper.run_dir(out, name, 0), "results.json")) as f:
      test = json.load(f)["splits"]["test"]
    assert v["trained_depth"] == trained and v["train_steps"] == 2
    assert v["param_count"] > 0
    assert v["flops_per_example"]["train"] > v["flops_per_example"]["inference"] > 0
    hops = v["accuracy_by_hops_and_depth"]
    assert set(hops) == set(test["by_hops"])
    for h, by_r in test["by_hops"].items():
      assert set(hops[h]) == set(by_r)  # rvlm: r = 1..2R
      for r, acc in by_r.items():
        assert hops[h][r]["mean"] == pytest.approx(acc) and hops[h][r]["std"] == 0.0
    assert max(int(r) for r in hops["1"]) == (2 * R if name == "rvlm" else 1)
    assert v["h90"]["values"] == [depth.h90(test["by_hops"], trained)]
    for r, share in test["flips_to_wrong_by_depth"].items():
      assert v["flips_to_wrong_by_depth"][r]["mean"] == pytest.approx(share)
    for key in depth.FIG1_KEYS:
      assert v["fig1"][key]["1"]["mean"] == pytest.approx(test[key]["1"])
    assert "connector_alpha_final" in v and v["curriculum_final_level"]["values"]
  assert on_disk["rvlm"]["connector_alpha_final"]["mean"] > 0
  claims = on_disk["claims"]
  assert claims["a_h90_rvlm_at_least_2x_standard"]["status"] == "measured"
  assert claims["b_hard_hops_rvlm_minus_vanilla"]["status"] == "not run"
  assert claims["c_rvlm_monotone_in_depth"]["status"] == "measured"
  assert all("met" in c for c in claims.values())
  for name in ("accuracy_by_hops.png", "results.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert report.study_variants(on_disk).keys() == {"standard", "rvlm"}
