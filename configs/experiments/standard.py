"""Standard transformer baseline: R = 1, same parameters as the recursive models.

  python -m rvlm.main --config=configs/experiments/standard.py --workdir=/tmp/rvlm_standard
"""
from configs.experiments import common


def get_config(arg=None):
  return common.get_config("standard", arg)
