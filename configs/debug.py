"""A tiny model on the embedded dataset: trains in well under a minute (tests, smoke runs).

  python -m rvlm.main --config=configs/debug.py --workdir=/tmp/rvlm_debug
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  m = c.model
  m.vit.update(width=32, depth=1, num_heads=2, mlp_dim=64)
  m.decoder.update(width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
  m.recursion.num_steps = 2
  m.connector.num_layers = 2
  c.data.batch_size = 16
  c.optim.warmup_steps = 5
  c.train.update(total_steps=20, log_every=5, eval_every=10, checkpoint_every=10)
  c.eval.update(batch_size=32, num_examples=64)
  return c
