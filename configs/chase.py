"""RecursiveVLM on the depth-demanding `chase` family (pointer chasing) with a curriculum.

  python -m rvlm.main --config=configs/chase.py --workdir=/tmp/rvlm_chase

Each hop is one lookup ("the cell my pointer names"), chains end at fixed points and
come with distractor chains of the same length (rvlm/data/chase.py). Train h rises from
2 to `max_hops` as the model masters each level (rvlm/data/curriculum.py); val and test
ask 1..12 hops, so hop counts beyond the trained ones are measured too.
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  m = c.model
  m.vit.update(image_size=48, patch_size=8, depth=1)   # a 6x6 grid: 36 cells
  m.decoder.depth = 2                                  # D: the shared block
  m.recursion.num_steps = 4                            # R
  m.connector.num_layers = 2
  m.connector.alpha_init = 0.1
  e = c.data.embedded
  # Decoys (lone plain squares) hide which squares are chain ends: without them every
  # calibration run settled on "answer some end's colour" (1/C) instead of the lookup.
  e.update(families="chase", max_hops=8, eval_max_hops=12, hop_focus=0.5, chase_chains=3,
           chase_decoys=8)
  c.data.curriculum.update(enabled=True, start=1, threshold=0.9, every=50, num_examples=128)
  c.data.seq_len = 10                                  # bos + 6 words + answer + eos
  c.train.update(total_steps=1500, eval_every=500, checkpoint_every=500)
  c.eval.update(num_examples=1200, splits=("val", "test"), max_depth=8)
  return c
