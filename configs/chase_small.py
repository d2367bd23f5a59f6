"""`chase` on a 4x4 grid with a per-patch encoder and a one-layer block: the recursion
steps have to carry the hops.

  python -m rvlm.main --config=configs/chase_small.py --workdir=/tmp/rvlm_chase_small

Why this shape (docs/depth.md, "Symbolic runs" and the VLM runs after them):
  * decoder depth D = 1: a step can do one hop, so h = 2 cannot be answered without
    handing the state to the next step. With D = 2 every recursive run did all its
    hops inside step 1, flat in depth, and stopped where the standard model did;
  * vit.depth = 0 (a per-patch encoder): with two ViT layers the image tokens did the
    hops themselves (h = 3 at 0.80 already at r = 1), the connector's alpha fell from
    0.1 to 0.03 and depth stopped mattering;
  * 16 colours on 16 cells: perception is learned in under 1,000 steps; h reaches 5 in
    training and 7 at test (2 chains of 8 fill the grid; 4 decoys fit up to h = 5).
"""
from configs import chase


def get_config(arg=None):
  c = chase.get_config(arg)
  m = c.model
  m.vit.update(image_size=32, depth=0)                 # 4x4 patches, no ViT blocks
  m.decoder.depth = 1
  m.connector.num_layers = 1
  c.data.embedded.update(chase_colours=16, max_hops=5, eval_max_hops=7, chase_chains=2,
                         chase_decoys=4)
  c.train.update(total_steps=4000, eval_every=2000, checkpoint_every=1000)
  c.eval.update(num_examples=700)
  return c
