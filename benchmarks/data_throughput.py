"""Input pipeline throughput against the trainer's consumption rate.

  python benchmarks/data_throughput.py --config=configs/base.py --workers=0,2

Prints examples/s of build_train_iterator for each worker count and the ratio to
--consume_rate (the trainer eats ~64 examples per ~0.3 s step, ~200 examples/s on
2 CPU cores). The pipeline keeps up when the ratio is well above 1 (goal >= 5x):
the trainer and the pipeline share the same cores.
"""
import time

from absl import app
from absl import flags
from ml_collections import config_flags

def measure(config, batches, warmup):
  """examples/s of the train iterator over `batches` batches after `warmup`."""
  from rvlm import data  # pylint: disable=g-import-not-at-top
  it = data.build_train_iterator(config)
  try:
    for _ in range(warmup):
      next(it)
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * config.data.batch_size / (time.perf_counter() - t)
  finally:
    it.close()


def main(argv):
  del argv
  config = FLAGS.config
  print(f"data={config.data.name} batch={config.data.batch_size} "
        f"image={config.model.vit.image_size} seq_len={config.data.seq_len}")
  for w in FLAGS.workers:
    config.data.num_workers = int(w)
    rate = measure(config, FLAGS.batches, FLAGS.warmup)
    print(f"num_workers={w}: {rate:8.0f} examples/s = {rate / FLAGS.consume_rate:5.1f}x the "
          f"consume rate of {FLAGS.consume_rate:.0f} examples/s")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", "configs/base.py", "Config file.")
  flags.DEFINE_list("workers", ["0", "2"], "Worker counts to measure.")
  flags.DEFINE_integer("batches", 60, "Timed batches per setting.")
  flags.DEFINE_integer("warmup", 5, "Untimed batches (worker start-up).")
  flags.DEFINE_float("consume_rate", 200.0, "Trainer examples/s to compare to.")
  FLAGS = flags.FLAGS
  app.run(main)
