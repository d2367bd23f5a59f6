"""Training speed on your own data against the embedded default, on this machine, in one run.

  python benchmarks/own_data_throughput.py [--records=20000] [--steps=40] [--old_default]

Writes a LLaVA-format file of short visual QA records like a user's (questions under
50 characters, one-word answers, small PNGs) into a temp dir, then trains, one after
the other in this process:
  embedded     configs/base.py (the embedded default)
  own data     configs/llava_format.py as shipped: tokenizer 'auto', seq_len 0 (auto),
               buckets 'auto' (the tokenizer and the length are fitted first; their time
               is printed separately)
  old default  (--old_default) the same file with byte tokens at 256 positions and no
               buckets: what configs/llava_format.py did before
Each run trains --steps steps and reports the trainer's own examples/s (its progress
meter, from the second logged window on: compile excluded). Prints the ratio of own
data to embedded; the goal is >= 0.5.
"""
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402
from configs import llava_format  # noqa: E402
from rvlm import train  # noqa: E402
from rvlm.utils import machine  # noqa: E402

flags.DEFINE_integer("records", 20_000, "Records in the generated LLaVA file.")
flags.DEFINE_integer("images", 200, "Distinct PNGs the records point to.")
flags.DEFINE_integer("steps", 40, "Train steps per run.")
flags.DEFINE_bool("old_default", False, "Also time byte tokens at 256 positions (slow).")
flags.DEFINE_string("dir", "", "Where to write the data and workdirs (default: a temp dir).")
FLAGS = flags.FLAGS

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "ball", "box", "cup", "car"]
TEMPLATES = [("What colour is the {s}?", "{c}"), ("Is there a {c} {s}?", "yes"),
             ("How many {s}s are there?", "{n}"), ("What is left of the {s}?", "{t}"),
             ("Is the {s} {c}?", "no"), ("Which shape is {c}?", "{t}")]


def write_llava(root, records, images, seed=0):
  """records short QA pairs over `images` small PNGs; returns (json path, image dir)."""
  rng = np.random.default_rng(seed)
  img_dir = os.path.join(root, "images")
  os.makedirs(img_dir, exist_ok=True)
  for k in range(images):
    size = int(rng.integers(24, 64))
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(img_dir, f"{k}.png"))
  path = os.path.join(root, "train.jsonl")
  lengths = []
  with open(path, "w") as f:
    for i in range(records):
      q, a = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
      fill = dict(c=COLOURS[int(rng.integers(8))], s=SHAPES[int(rng.integers(8))],
                  t=SHAPES[int(rng.integers(8))], n=str(int(rng.integers(1, 6))))
      q, a = q.format(**fill), a.format(**fill)
      lengths.append(len(q))
      f.write(json.dumps({"id": str(i), "image": f"{int(rng.integers(images))}.png",
                          "conversations": [{"from": "human", "value": "<image>\n" + q},
                                            {"from": "gpt", "value": a}]}) + "\n")
  return path, img_dir, max(lengths)


def timed_run(name, config, workdir, steps):
  config.train.update(total_steps=steps, log_every=max(1, steps // 4), eval_every=10 * steps,
                      checkpoint_every=10 * steps)
  config.eval.update(num_examples=64, batch_size=64, generated=False)
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 5)
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "examples_per_sec" in r]
  # The first window holds the compile; the later ones are the steady state.
  rates = [r["examples_per_sec"] for r in rows[1:]] or [r["examples_per_sec"] for r in rows]
  with open(os.path.join(workdir, "hparams.json")) as f:
    hp = json.load(f)
  return {"name": name, "examples_per_sec": float(np.median(rates)), "wall_s": wall,
          "seq_len": hp["data/seq_len"], "tokenizer": hp["data/tokenizer/kind"],
          "buckets": hp.get("data/buckets", "none"), "vocab": hp["model/vocab_size"]}


def own_config(path, img_dir):
  c = llava_format.get_config()
  c.data.update(train_json=path, eval_json=path, image_dir=img_dir)
  return c


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  root = FLAGS.dir or tempfile.mkdtemp(prefix="rvlm_own_data_")
  t0 = time.perf_counter()
  path, img_dir, longest_q = write_llava(root, FLAGS.records, FLAGS.images)
  print(f"machine: {machine.describe()}")
  print(f"data: {FLAGS.records} records over {FLAGS.images} PNGs (24-63 px), questions up to "
        f"{longest_q} characters, one-word answers, written in {time.perf_counter() - t0:.1f} s "
        f"to {root}")
  runs = [("embedded default", base.get_config(), "embedded")]
  runs.append(("own data (llava_format defaults)", own_config(path, img_dir), "own"))
  if FLAGS.old_default:
    old = own_config(path, img_dir)
    old.data.update(seq_len=256, buckets="none")
    old.data.tokenizer.kind = "bytes"
    old.model.vocab_size = 260
    runs.append(("old default (bytes, 256 positions)", old, "old"))
  results = []
  for name, config, sub in runs:
    workdir = os.path.join(root, sub)
    if sub == "own":  # fit the tokenizer and length first, to time them on their own
      from rvlm.data import resolve  # pylint: disable=g-import-not-at-top
      t = time.perf_counter()
      resolve.resolve(config, workdir)
      print(f"own data: tokenizer + text length fitted in {time.perf_counter() - t:.1f} s "
            "(once per workdir)")
    results.append(timed_run(name, config, workdir, FLAGS.steps))
    r = results[-1]
    print(f"{name}: {r['examples_per_sec']:.1f} examples/s (seq_len {r['seq_len']}, "
          f"{r['tokenizer']} {r['vocab']} ids, buckets {r['buckets']}; {FLAGS.steps} steps, "
          f"{r['wall_s']:.0f} s wall with compile and eval)")
  ref = results[0]["examples_per_sec"]
  for r in results[1:]:
    print(f"ratio {r['name']} / embedded default: {r['examples_per_sec'] / ref:.2f} "
          "(goal for own data: >= 0.5)")


if __name__ == "__main__":
  app.run(main)
