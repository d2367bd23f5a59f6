"""The full embedded multi-hop mix: lookups, grid-relation chains of 1-3 hops, arrow
pointers of 1-3 hops, counting, existence and comparison questions.

  python -m rvlm.main --config=configs/multihop.py --workdir=/tmp/rvlm_multihop

This is the setting where recursion depth should matter, and it is much harder than the
10-minute default: in calibration runs (README, "Measured") 600-3000 steps of the
`small` preset stayed at the per-family answer priors (about 0.26 exact match, majority
0.13). Budgets and recipes that learn it are still being measured.
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.data.embedded.families = "lookup,relate,chain2,chain3,compare,count,exist,pointer"
  c.train.update(total_steps=6000, eval_every=1000, checkpoint_every=1000)
  c.optim.warmup_steps = 200
  return c
