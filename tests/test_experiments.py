"""The paper study: its configs, FLOP counter, aggregation over seeds and the runner."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.experiments import paper as paper_configs
from rvlm import flops
from rvlm import losses
from rvlm.experiments import paper
from rvlm.experiments import report
from rvlm.models import vlm


def _flat(d):
  return traverse_util.flatten_dict(d, sep=".")


# ---- configs -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(paper_configs.VARIANTS))
def test_every_variant_builds_and_validates(variant):
  c = paper_configs.get_config(f"variant={variant}")
  vlm.check_model_config(c.model)
  losses.check_loss_config(c.loss, c.model.recursion.num_steps)
  assert c.train.checkpoint_every == c.train.total_steps  # one save, at the end


def test_variants_differ_from_their_reference_only_where_stated():
  n = 100
  cfg = lambda v: _flat(paper_configs.get_config(f"variant={v},steps={n}").to_dict())  # noqa: E731
  rvlm = cfg("rvlm")
  for name, spec in paper_configs.VARIANTS.items():
    if spec.mode != "rvlm" or spec.init_from:
      continue
    differ = {k for k in rvlm if cfg(name)[k] != rvlm[k]}
    assert differ == {f for f, _ in spec.overrides}, name
  std, iso = cfg("standard"), cfg("standard_iso_flops")
  assert std["model.recursion.num_steps"] == 1 and rvlm["model.recursion.num_steps"] == 3
  assert std["train.total_steps"] == n and iso["train.total_steps"] == 3 * n
  assert rvlm["loss.beta"] == 2.0 and cfg("rvlm_beta4")["loss.beta"] == 4.0
  assert cfg("vanilla")["loss.kind"] == "final_only"
  two = cfg("twostage_rvlm")
  assert two["train.total_steps"] == n // 2
  assert two["init_from_allow_new"] == (r".*connector.*",)
  with pytest.raises(ValueError, match="unknown variant 'rvlm_nope'"):
    paper_configs.get_config("variant=rvlm_nope")
  with pytest.raises(ValueError, match="unknown argument 'size'"):
    paper_configs.get_config("size=3")


def test_set_field_refuses_unknown_fields():
  c = paper_configs.get_config()
  paper_configs.set_field(c, "optim.lr", 2e-3)
  assert c.optim.lr == 2e-3
  for field in ("optim.lrr", "optimm.lr", "optim.lr.x"):
    with pytest.raises(ValueError, match="unknown config field"):
      paper_configs.set_field(c, field, 1.0)


def test_dependencies_are_ordered_first():
  assert paper.ordered(["twostage_rvlm", "rvlm"]) == ["standard", "twostage_rvlm", "rvlm"]
  with pytest.raises(ValueError, match="unknown variant"):
    paper.ordered(["bogus"])


# ---- FLOPs ---------------------------------------------------------------------------


def test_flop_counter_multiplies_scans_and_counts_backward_and_remat():
  x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
  one = 2 * 4 * 8 * 8
  assert flops.count_flops(lambda x, w: x @ w, x, w) == one

  def looped(x, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=5)[0].sum()

  assert flops.count_flops(looped, x, w) == 5 * one
  # Backward: one matmul for the input cotangent and one for the weight gradient.
  assert flops.count_flops(jax.grad(looped, argnums=1), x, w) == 3 * 5 * one
  # Rematerialised: the forward runs again inside the backward pass.
  assert flops.count_flops(jax.grad(jax.checkpoint(looped), argnums=1), x, w) == 4 * 5 * one


def test_model_flops_grow_linearly_with_depth():
  c = paper_configs.get_config("variant=rvlm,preset=tiny")
  c.model.vocab_size, c.model.vit.image_size = 128, 32
  costs = paper.model_costs(c)
  infer = costs["inference_flops_per_example_by_depth"]
  f = [infer[str(r)] for r in (1, 2, 3)]
  # Every extra step is one more pass of the decoder stack plus the connector.
  assert f[0] > 0 and f[2] - f[1] == f[1] - f[0] > 0
  # Analytic check of step 1 alone (ViT + projector + decoder + LM head, matmuls only).
  m, t = c.model, c.data.seq_len
  vit, dec = m.vit, m.decoder
  p = (vit.image_size // vit.patch_size) ** 2
  vit_f = 2 * p * vit.patch_size ** 2 * 3 * vit.width + vit.depth * (
      2 * p * 4 * vit.width ** 2 + 2 * 2 * p * p * vit.width + 2 * p * 2 * vit.width * vit.mlp_dim)
  proj_f = 2 * p * (vit.width * dec.width + dec.width * dec.width)  # mlp projector
  n = p + t
  q, kv = dec.num_heads * dec.head_dim, dec.num_kv_heads * dec.head_dim
  layer = (2 * n * dec.width * (2 * q + 2 * kv) + 2 * 2 * n * n * q
           + 2 * n * 3 * dec.width * dec.mlp_dim)
  head = 2 * n * dec.width * m.vocab_size
  assert f[0] == vit_f + proj_f + dec.depth * layer + head


# ---- aggregation ---------------------------------------------------------------------


def _split(acc, fam_acc, norm):
  return {"accuracy_by_depth": acc, "loss_by_depth": {d: 1 - a for d, a in acc.items()},
          "input_norm_by_depth": norm, "hidden_norm_by_depth": norm,
          "cka_with_e0_by_depth": {d: 1.0 for d in acc},
          "by_family": {"lookup": fam_acc}, "by_hops": {"1": fam_acc},
          "majority_baseline": 0.3, "num_examples": 10}


def _record(acc, alpha=None, wall=10.0):
  split = _split(acc, acc, {d: 1.0 + int(d) for d in acc})
  return {"results": {"splits": {"test": split, "val": split}},
          "info": {"wall_time_s": wall, "steps_per_sec": 2.0, "connector_alpha_final": alpha}}


def test_aggregate_is_mean_and_sample_std_over_seeds():
  accs = [{"1": 0.5, "2": 0.6}, {"1": 0.7, "2": 0.9}, {"1": 0.6, "2": 0.6}]
  agg = report.aggregate([_record(a, alpha=x) for a, x in zip(accs, (0.5, 1e-5, 0.7))])
  for d in ("1", "2"):
    v = np.array([a[d] for a in accs])
    assert agg["accuracy_by_depth"][d]["mean"] == pytest.approx(v.mean())
    assert agg["accuracy_by_depth"][d]["std"] == pytest.approx(v.std(ddof=1))
    assert agg["splits"]["val"]["by_family"]["lookup"][d]["mean"] == pytest.approx(v.mean())
  assert agg["collapsed_runs"] == 1 and agg["num_seeds"] == 3
  assert report.aggregate([_record(accs[0])])["accuracy_by_depth"]["1"]["std"] == 0.0


def test_claims_compare_final_depth_and_check_monotonicity():
  mk = lambda accs: report.aggregate([_record(a) for a in accs])  # noqa: E731
  variants = {"standard": mk([{"1": 0.70}]), "vanilla": mk([{"1": 0.6, "2": 0.62, "3": 0.65}]),
              "rvlm": mk([{"1": 0.70, "2": 0.74, "3": 0.74}])}
  c = report.claims(variants)
  assert c["rvlm_minus_standard_points"] == pytest.approx(4.0)
  assert c["beats_standard_by_3_points"] is True
  assert c["rvlm_minus_vanilla_points"] == pytest.approx(9.0)
  assert c["beats_vanilla_by_7_points"] is True
  assert c["rvlm_non_decreasing_in_depth"] is True
  variants["rvlm"] = mk([{"1": 0.70, "2": 0.75, "3": 0.72}])
  c = report.claims(variants)
  assert c["rvlm_non_decreasing_in_depth"] is False
  assert c["beats_standard_by_3_points"] is False


def test_override_parsing():
  assert report.parse_override("optim.lr=2e-3") == ("optim.lr", 2e-3)
  assert report.parse_override("data.embedded.families=lookup") == (
      "data.embedded.families", "lookup")
  with pytest.raises(ValueError, match="field=value"):
    report.parse_override("optim.lr")


# ---- the runner, end to end ----------------------------------------------------------

_TINY = (("model.vocab_size", 160), ("model.vit.image_size", 32), ("data.batch_size", 16),
         ("eval.num_examples", 64), ("eval.batch_size", 32))


def test_runner_trains_every_seed_aggregates_and_resumes(tmp_path):
  out = str(tmp_path / "study")
  kw = dict(variants=["twostage_rvlm", "rvlm"], seeds=2, steps_n=4, preset="tiny",
            overrides=_TINY)
  summary = paper.run_study(out, **kw)
  assert list(report.study_variants(summary)) == ["standard", "twostage_rvlm", "rvlm"]
  for name, v in report.study_variants(summary).items():
    per_seed = []
    for s in range(2):
      with open(os.path.join(paper.run_dir(out, name, s), "results.json")) as f:
        per_seed.append(json.load(f))
    for d, m in v["accuracy_by_depth"].items():
      vals = [r["splits"]["test"]["accuracy_by_depth"][d] for r in per_seed]
      assert m["values"] == pytest.approx(vals) and m["mean"] == pytest.approx(np.mean(vals))
    assert v["train_flops_per_example"] > 0 and v["wall_time_s"]["mean"] > 0
    assert v["train_time_s"]["mean"] > 0
  # The two seeds are different runs; stage 2 started from its own seed's stage 1.
  seeds = summary["rvlm"]["splits"]["test"]["loss_by_depth"]["1"]["values"]
  assert seeds[0] != seeds[1]
  assert summary["twostage_rvlm"]["train_steps"] == 2
  # The connector's projections are the only parameters the standard model lacks.
  assert summary["twostage_rvlm"]["param_count"] == summary["rvlm"]["param_count"]
  assert summary["rvlm"]["param_count"] > summary["standard"]["param_count"]
  with open(os.path.join(out, "results.json")) as f:
    on_disk = json.load(f)
  # docs/results/paper.json is this file: variant name -> accuracy_by_depth -> mean, std.
  assert set(on_disk["rvlm"]["accuracy_by_depth"]) == {"1", "2", "3"}
  assert {"mean", "std"} <= set(on_disk["standard"]["accuracy_by_depth"]["1"])
  assert "rvlm_minus_standard_points" in on_disk["claims"]
  for name in ("accuracy_by_depth.png", "fig1_norm_cka.png", "results.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  # Rerunning the command retrains nothing and gives the same summary.
  stamp = os.path.getmtime(os.path.join(paper.run_dir(out, "rvlm", 1), "results.json"))
  again = paper.run_study(out, **kw)
  assert os.path.getmtime(os.path.join(paper.run_dir(out, "rvlm", 1), "results.json")) == stamp
  assert again["rvlm"]["accuracy_by_depth"] == summary["rvlm"]["accuracy_by_depth"]


def test_command_line_rejects_unknown_variants(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "rvlm.experiments.paper", f"--out={tmp_path}",
       "--variants=rvlm,bogus"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=300)
  assert proc.returncode != 0
  assert "unknown variant 'bogus'" in proc.stderr
  assert not os.path.exists(tmp_path / "runs")
