"""The depth study: do recursion steps buy longer pointer chains (configs/chase.py)?

The whole study (every variant, 3 seeds; OUT/depth.json, OUT/results.md and
OUT/accuracy_by_hops.png):

  python -m rvlm.experiments.depth --out=/tmp/rvlm_depth

Smoke version (1 seed, N = 40, fewer eval examples; < 15 min on a 2-core CPU):

  python -m rvlm.experiments.depth --out=/tmp/rvlm_depth_quick --quick

One variant alone, as the study trains it:

  python -m rvlm.main --config=configs/experiments/depth.py:variant=rvlm,seed=1 \
      --workdir=/tmp/rvlm_depth_rvlm

Every variant is configs/chase.py (task, hop curriculum, model, the block of D decoder
layers, R) with the changes its VARIANTS entry states; nothing is copied from chase,
so retuning configs/chase.py retunes the study. Recursive variants are evaluated at
depths 1..2R (depth extrapolation), standard ones at their single depth.

Arguments (comma-separated key=value): variant (see VARIANTS), steps (N, the training
steps; default STEPS = configs/chase.py's train.total_steps; standard_iso_flops trains
R x N), seed, preset (model preset under chase's overrides; default chase's own).
"""
import dataclasses

from configs import chase
from configs.experiments import common
from configs.experiments.paper import set_field

# N: chase's own budget, read (not copied) so that a retuned chase config moves the study.
STEPS = int(chase.get_config().train.total_steps)


@dataclasses.dataclass(frozen=True)
class Variant:
  mode: str                  # standard | vanilla | rvlm (common.apply_mode)
  about: str
  overrides: tuple = ()      # ((dotted config field, value), ...) on top of the mode
  iso_flops: bool = False    # trained R x N steps: the recursive models' training compute
  deep: bool = False         # decoder depth R x D: the recursive models' depth as parameters


VARIANTS = {
    "standard": Variant("standard", "R = 1: the block of D layers once, same parameters"),
    "standard_iso_flops": Variant(
        "standard", "R = 1 trained R x N steps: the recursive models' training compute",
        iso_flops=True),
    "standard_deep": Variant(
        "standard", "R = 1 with R x D distinct layers: R x the parameters (upper bound)",
        deep=True),
    "vanilla": Variant("vanilla", "R steps, final hidden state fed back, final-step loss"),
    "rvlm": Variant("rvlm", "R steps, Recursive Connector + Monotonic Recursion Loss"),
    # Ablations of RecursiveVLM, one change each.
    "rvlm_beta1": Variant("rvlm", "beta = 1: every step's loss, no monotonic penalty",
                          (("loss.beta", 1.0),)),
    "rvlm_final_only": Variant("rvlm", "connector, loss on the final step only",
                               (("loss.kind", "final_only"),)),
    "rvlm_base_none": Variant("rvlm", "connector without E_0 re-injection (base = none)",
                              (("model.connector.base", "none"),)),
}


def parse_arg(arg):
  return common.parse_variant_arg(arg, dict(variant="rvlm", steps=str(STEPS), seed="0", preset=""), VARIANTS,
                                  "configs/experiments/depth.py")


def get_config(arg=None):
  args = parse_arg(arg)
  v = VARIANTS[args["variant"]]
  c = chase.get_config(f"preset={args['preset']}" if args["preset"] else None)
  r, d = int(c.model.recursion.num_steps), int(c.model.decoder.depth)
  common.apply_mode(c, v.mode)  # recursive modes keep chase's R
  # Recursive models are also read at depths R+1..2R: does extra depth at test time
  # extend the chains they follow? (train.eval_depth: mode none has one depth only.)
  c.eval.max_depth = 0 if v.mode == "standard" else 2 * r
  if v.deep:
    c.model.decoder.depth = r * d
  for field, value in v.overrides:
    set_field(c, field, value)
  total = max(1, (r if v.iso_flops else 1) * int(args["steps"]))
  t = c.train
  # Tiny budgets (--quick, tests) still reach the peak learning rate; N = STEPS keeps
  # chase's warmup.
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, total // 5))
  # One evaluation, at the end (results.json); checkpoints as chase saves them, for
  # resuming long runs, keeping the last only.
  t.update(total_steps=total, log_every=min(t.log_every, total), eval_every=total,
           checkpoint_every=min(t.checkpoint_every, total), keep_checkpoints=1)
  c.seed = int(args["seed"])
  return c
