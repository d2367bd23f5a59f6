"""Trains and evaluates a recursive VLM.

  python -m rvlm.main --config=configs/base.py --workdir=/tmp/rvlm

Any config field can be overridden: `--config.model.recursion.num_steps=4`. Several
processes (TPU pod hosts, one per GPU, or local CPU processes) run this same command;
rvlm/distributed.py says where their settings come from, and launch/ starts them.
Kept short on purpose; the logic lives in `rvlm.train.train_and_evaluate`, callable
from tests.
"""
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from rvlm import distributed
from rvlm import metrics
from rvlm import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results "
                    "(the same path, e.g. gs://..., on every process).")
flags.mark_flags_as_required(["workdir"])
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                  "Multi-process start-up: on = always jax.distributed.initialize (JAX "
                  "detects TPU pods / SLURM unless the settings below are given); auto = "
                  "when settings are given or the environment lists several tasks; off.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 "
                    "(env RVLM_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in the job (env RVLM_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (env RVLM_PROCESS_ID).")
flags.DEFINE_integer("heartbeat_timeout_s", None, "Seconds without a peer's heartbeat "
                     "before every process is stopped (env RVLM_HEARTBEAT_TIMEOUT_S; "
                     f"default {distributed.DEFAULT_HEARTBEAT_S}).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics.quiet_library_logs()
  try:
    settings = distributed.resolve(
        FLAGS.distributed, coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
        heartbeat_timeout_s=FLAGS.heartbeat_timeout_s)
  except ValueError as e:
    print(f"rvlm.main: {e}", file=sys.stderr)
    sys.exit(2)
  distributed.initialize(settings)
  logging.info("process %d/%d, local devices %s", jax.process_index(), jax.process_count(),
               jax.local_devices())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
