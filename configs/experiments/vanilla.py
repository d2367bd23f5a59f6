"""Vanilla recursive baseline: the final hidden state is fed straight back as the next
input (R = 3), trained on the final step.

  python -m rvlm.main --config=configs/experiments/vanilla.py --workdir=/tmp/rvlm_vanilla
"""
from configs.experiments import common


def get_config(arg=None):
  return common.get_config("vanilla", arg)
