"""RecursiveVLM: Recursive Connector + Monotonic Recursion Loss (R = 3).

  python -m rvlm.main --config=configs/experiments/rvlm.py --workdir=/tmp/rvlm_rvlm
"""
from configs.experiments import common


def get_config(arg=None):
  return common.get_config("rvlm", arg)
