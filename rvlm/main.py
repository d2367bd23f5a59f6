"""Trains and evaluates a recursive VLM.

  python -m rvlm.main --config=configs/base.py --workdir=/tmp/rvlm

Any config field can be overridden: `--config.model.recursion.num_steps=4`. Kept short
on purpose; the logic lives in `rvlm.train.train_and_evaluate`, callable from tests.
"""
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rvlm import metrics
from rvlm import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["workdir"])
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logs()
  if os.environ.get("RVLM_JAX_INIT"):  # multi-host launches (launch/) set this
    jax.distributed.initialize()
  logging.info("process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
