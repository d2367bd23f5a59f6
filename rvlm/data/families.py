"""Question families of the embedded dataset, each built directly from its answer.

Every generator draws the answer first (uniformly over the family's answer set) and
then builds a scene that makes it true: the path of a chain is chosen, then the
objects along it, then distractors that cannot change the answer. Nothing is
rejection-sampled, so answers are balanced within a family by construction (the
tests check a stated bound) and guessing is held at the family's chance floor.

Families and their reasoning steps (`hops`):
  lookup   1   what shape is the red object ?                          -> shape
  relate   1   what colour is the object left of the red object ?      -> colour
  chain2   2   ... the object below the object left of the red object  -> colour
  chain3   3   three nested grid relations                             -> colour
  compare  2   is the red object the same shape as the blue object ?   -> yes/no
  count    1   how many large circles are there ?                      -> 0..max_count
  exist    1   is there a small triangle ?                             -> yes/no
  pointer  h   start at the red arrow . follow h arrows . what colour ?  (h tunable)
  chase    h   where does the red chain end ?                          -> colour
count and exist are perception controls; pointer and chase are the families whose depth
is explicit and set by `max_hops`: each arrow points at the neighbouring cell to visit
next; each chase node names the colour of the next node (chase.py: the depth-demanding
family, with distractor chains of the same length and ends that are fixed points).

Relations are between neighbouring grid cells ("right of X" = the cell right of X's),
and chain paths never revisit a cell, so no step undoes the previous one.

Answer balance (tested): within a family each answer's share is 1/k in expectation
(k = len(answer_set)); over 160*k samples every share lies within (1 +- 0.35)/k.
Chance floors with the default 8 colours / 3 shapes / max_count 3: lookup 1/3,
relate/chain2/chain3/pointer 1/8 overall and 1/7 given the question (the named
colour is never the answer), compare 1/2, exist 1/2, count 1/4.
"""
import dataclasses

import numpy as np

from rvlm.data import chase
from rvlm.data import scenes

FAMILIES = ("lookup", "relate", "chain2", "chain3", "compare", "count", "exist",
            "pointer", "chase")
# Records from LLaVA-format files carry this family (index len(FAMILIES)).
LLAVA_FAMILY = "llava"
ALL_FAMILIES = FAMILIES + (LLAVA_FAMILY,)

# Relation words for a move from an object X to its neighbour Y: Y is "<rel> X".
_REL = {0: "above", 1: "below", 2: "left of", 3: "right of"}
_PLURAL = {"square": "squares", "circle": "circles", "triangle": "triangles",
           "diamond": "diamonds"}


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything a generator needs; built once from config.data.embedded."""
  grid: int
  num_colours: int
  num_shapes: int
  min_objects: int
  max_objects: int
  max_hops: int
  max_count: int
  allowed: np.ndarray   # bool [num_colours, num_shapes]: pairs a scene may contain
  heldout: tuple        # ((colour, shape), ...) kept out of train/val/test scenes
  comp: bool            # test_comp: one named object carries a held-out pair
  chase_chains: int = 3  # chase: chains per scene (fewer when long ones do not fit)
  chase_colours: int = 26  # chase: palette size (chase.PALETTE)
  chase_decoys: int = 0  # chase: lone plain squares on no chain (shortcut guard)
  hop_focus: float = 0.0  # pointer/chase: share of examples drawn at max_hops exactly


def answer_set(family: str, spec: Spec) -> tuple:
  """The answers a family can produce (for balance checks and chance floors)."""
  colours = scenes.COLOUR_NAMES[:spec.num_colours]
  if family == "lookup":
    return scenes.SHAPES[:spec.num_shapes]
  if family in ("compare", "exist"):
    return ("yes", "no")
  if family == "count":
    return tuple(str(k) for k in range(spec.max_count + 1))
  if family == "chase":
    return chase.NAMES[:spec.chase_colours]
  return colours


class _Builder:
  """Accumulates objects with unique colours, unique cells and allowed pairs."""

  def __init__(self, rng, spec):
    self.rng, self.spec = rng, spec
    self.rows = []
    self.free_cells = {(r, c) for r in range(spec.grid) for c in range(spec.grid)}
    self.free_colours = set(range(spec.num_colours))

  def add(self, colour, shape, size, cell, direction=-1):
    assert colour in self.free_colours and tuple(cell) in self.free_cells
    self.free_colours.discard(colour)
    self.free_cells.discard(tuple(cell))
    self.rows.append([colour, shape, size, cell[0], cell[1], direction])

  def cell(self):
    cells = sorted(self.free_cells)
    return cells[self.rng.integers(len(cells))]

  def colour_for(self, shape, exclude=()):
    """A free colour that may pair with `shape` (any free colour for arrows)."""
    ok = [c for c in sorted(self.free_colours) if c not in exclude and
          (shape == scenes.ARROW or self.spec.allowed[c, shape])]
    return ok[self.rng.integers(len(ok))]

  def fill(self, total, forbid=None, arrows=False):
    """Adds random distractors up to `total` objects; `forbid` = (shape, size)."""
    total = min(total, len(self.rows) + len(self.free_colours), self.spec.grid ** 2)
    while len(self.rows) < total:
      colour = sorted(self.free_colours)[self.rng.integers(len(self.free_colours))]
      if arrows:
        self.add(colour, scenes.ARROW, 1, self.cell(), int(self.rng.integers(4)))
        continue
      combos = [(s, z) for s in range(self.spec.num_shapes) for z in range(2)
                if self.spec.allowed[colour, s] and (s, z) != forbid]
      shape, size = combos[self.rng.integers(len(combos))]
      self.add(colour, shape, size, self.cell())

  def scene(self):
    return np.array(self.rows, dtype=np.int32).reshape(-1, 6)


def _num_objects(rng, spec, at_least):
  return max(at_least, int(rng.integers(spec.min_objects, spec.max_objects + 1)))


def _named_object(rng, spec, b, shape=None):
  """Colour and shape of the object a question names.

  In test_comp the named object takes a held-out (colour, shape) pair, so the model
  must recombine a colour and a shape it never saw together.
  """
  if spec.comp:
    cands = [p for p in spec.heldout if shape is None or p[1] == shape]
    cands = [p for p in cands if p[0] in b.free_colours] or cands
    colour, s = cands[rng.integers(len(cands))]
    return colour, s
  if shape is None:
    shape = int(rng.integers(spec.num_shapes))
  return b.colour_for(shape), shape


def _lookup(rng, spec):
  b = _Builder(rng, spec)
  shape = int(rng.integers(spec.num_shapes))
  if spec.comp:
    shape = spec.heldout[rng.integers(len(spec.heldout))][1]
  colour, shape = _named_object(rng, spec, b, shape)
  b.add(colour, shape, int(rng.integers(2)), b.cell())
  b.fill(_num_objects(rng, spec, 1))
  q = f"what shape is the {scenes.COLOUR_NAMES[colour]} object ?"
  return b.scene(), q, scenes.SHAPES[shape], 1


def _chain(rng, spec, hops):
  """Nested grid relations: the answer is the colour at the end of a walk."""
  b = _Builder(rng, spec)
  cells, moves = scenes.self_avoiding_path(rng, spec.grid, hops)
  answer = int(rng.integers(spec.num_colours))
  # The anchor is named; the target's colour is the answer; the cells in between
  # get fresh colours so every step of the chain names a distinct object.
  b.free_colours.discard(answer)
  anchor, anchor_shape = _named_object(rng, spec, b)
  b.free_colours.add(answer)
  b.add(anchor, anchor_shape, int(rng.integers(2)), cells[0])
  for k in range(1, hops + 1):
    if k == hops:
      shape = [s for s in range(spec.num_shapes) if spec.allowed[answer, s]]
      b.add(answer, shape[rng.integers(len(shape))], int(rng.integers(2)), cells[k])
    else:
      shape = int(rng.integers(spec.num_shapes))
      b.add(b.colour_for(shape, exclude=(answer,)), shape, int(rng.integers(2)),
            cells[k])
  b.fill(_num_objects(rng, spec, hops + 1))
  phrase = f"the {scenes.COLOUR_NAMES[anchor]} object"
  for m in moves.tolist():
    phrase = f"the object {_REL[m]} {phrase}"
  q = f"what colour is {phrase} ?"
  return b.scene(), q, scenes.COLOUR_NAMES[answer], hops


def _compare(rng, spec):
  b = _Builder(rng, spec)
  same = bool(rng.integers(2))
  c1, s1 = _named_object(rng, spec, b)
  b.add(c1, s1, int(rng.integers(2)), b.cell())
  if same:
    s2 = s1
  else:
    others = [s for s in range(spec.num_shapes) if s != s1]
    s2 = others[rng.integers(len(others))]
  c2 = b.colour_for(s2)
  b.add(c2, s2, int(rng.integers(2)), b.cell())
  b.fill(_num_objects(rng, spec, 2))
  q = (f"is the {scenes.COLOUR_NAMES[c1]} object the same shape as the "
       f"{scenes.COLOUR_NAMES[c2]} object ?")
  return b.scene(), q, "yes" if same else "no", 2


def _count_or_exist(rng, spec, family):
  b = _Builder(rng, spec)
  if family == "count":
    n = int(rng.integers(spec.max_count + 1))
  else:
    n = int(rng.integers(1, 3)) if rng.integers(2) else 0
  shape, size = int(rng.integers(spec.num_shapes)), int(rng.integers(2))
  if spec.comp:
    # A held-out pair in the scene: one of the counted objects, or (for a zero
    # answer) an object of the queried shape in the other size.
    colour, shape = spec.heldout[rng.integers(len(spec.heldout))]
    b.add(colour, shape, size if n else 1 - size, b.cell())
  for _ in range(n - (1 if spec.comp else 0)):
    b.add(b.colour_for(shape), shape, size, b.cell())
  b.fill(_num_objects(rng, spec, n + 1), forbid=(shape, size))
  what = f"{scenes.SIZES[size]} {scenes.SHAPES[shape]}"
  if family == "count":
    q = f"how many {scenes.SIZES[size]} {_PLURAL[scenes.SHAPES[shape]]} are there ?"
    return b.scene(), q, str(n), 1
  return b.scene(), f"is there a {what} ?", "yes" if n else "no", 1


def _pointer(rng, spec):
  """Follow h arrows from a named arrow; h is drawn from 1..max_hops."""
  hops = chase.draw_hops(rng, spec)
  b = _Builder(rng, spec)
  cells, moves = scenes.self_avoiding_path(rng, spec.grid, hops)
  answer = int(rng.integers(spec.num_colours))
  b.free_colours.discard(answer)
  start = b.colour_for(scenes.ARROW)
  b.free_colours.add(answer)
  b.add(start, scenes.ARROW, 1, cells[0], int(moves[0]))
  for k in range(1, hops + 1):
    # The last arrow points anywhere: the walk stops after h arrows, not at a sink.
    d = int(moves[k]) if k < hops else int(rng.integers(4))
    colour = answer if k == hops else b.colour_for(scenes.ARROW, exclude=(answer,))
    b.add(colour, scenes.ARROW, 1, cells[k], d)
  b.fill(_num_objects(rng, spec, hops + 1), arrows=True)
  word = "arrow" if hops == 1 else "arrows"
  q = (f"start at the {scenes.COLOUR_NAMES[start]} arrow . follow {hops} {word} . "
       "what colour ?")
  return b.scene(), q, scenes.COLOUR_NAMES[answer], hops


def generate(family: str, rng: np.random.Generator, spec: Spec):
  """Returns (scene [n, 6] int32, question, answer, hops) for one example."""
  if family == "lookup":
    return _lookup(rng, spec)
  if family == "relate":
    return _chain(rng, spec, 1)
  if family == "chain2":
    return _chain(rng, spec, 2)
  if family == "chain3":
    return _chain(rng, spec, 3)
  if family == "compare":
    return _compare(rng, spec)
  if family in ("count", "exist"):
    return _count_or_exist(rng, spec, family)
  if family == "pointer":
    return _pointer(rng, spec)
  if family == "chase":
    return chase.generate(rng, spec)
  raise ValueError(f"unknown embedded family {family!r}; known: {FAMILIES}")


def max_question_words(spec: Spec, families=FAMILIES) -> int:
  """Upper bound on question tokens (embedded vocabulary) over the given families."""
  # chain: "what colour is" + h x "the object <rel>" (<= 4 words) + "the c object ?"
  pointer = len(f"start at the c arrow . follow {spec.max_hops} arrows . "
                "what colour ?".split())
  bound = {"lookup": 7, "relate": 3 + 4 + 4, "chain2": 3 + 8 + 4, "chain3": 3 + 12 + 4,
           "compare": 12, "count": 7, "exist": 6, "pointer": pointer,
           "chase": len(chase.QUESTION.split())}
  return max(bound[f] for f in families)
