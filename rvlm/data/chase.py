"""The `chase` family: pointer chasing in which every hop is one colour lookup.

  where does the red chain end ?   -> the colour of the last node of the red chain

A node fills one grid cell (one ViT patch) with two colours:

  +--------+   ring (the outer quarter of the cell on each side): the node's own colour
  |########|   core (the square inside it): the colour of the node it points to.
  |##::::##|   Following a pointer means finding the cell whose ring has my core's
  |##::::##|   colour: the same primitive as the lookup family's "the red object".
  |##::::##|   A chain's end points to itself: ring and core share one colour (a plain
  |########|   square), a fixed point.
  +--------+

The scene holds C chains of exactly h hops each, start -> ... -> end, every node with
its own colour of the chase palette (PALETTE: 26 colours on a sphere around the grey
background), on random cells. The question names a chain by its start colour; the
answer is its end colour. So:
  * h = 1 is a pure lookup (the start's core is the answer); each further hop is one
    more lookup of the same kind;
  * no shortcut: the other chains are distractors of the same length, and colours and
    cells are random, so neither position, colour nor length tells which end belongs
    to the named start (a model that finds the ends but cannot follow scores 1/C);
  * an end is a fixed point, so following more pointers than h keeps the answer:
    extra recursion steps cannot make the right answer wrong, and depth extrapolation
    (test h beyond the trained maximum, test depths beyond R) is meaningful;
  * answers are balanced: the end colour is drawn first, uniformly over the palette,
    then the start colour from the rest (chance 1/(K-1) given the question).

C = min(chase_chains, K // (h + 1), G*G // (h + 1)), at least 2 (embedded.make_spec).
Up to `chase_decoys` lone plain squares (fixed points on no chain) fill free colours:
they look like ends, so the shortcut "answer some end's colour" drops to 1/(C + decoys).
Scene rows use the embedded layout (colour, shape, size, row, col, direction) with
shape = scenes.LINK, colour = the node's PALETTE index and direction = the PALETTE
index of the node it points to.
"""
import numpy as np

from rvlm.data import scenes

# The 26 directions of the RGB cube's lattice {-1, 0, 1}^3 \ {0}, each named by the
# web colour at that lattice corner or midpoint ("red" = (1, -1, -1) ~ (255, 0, 0);
# "grey" takes (-1, -1, -1), black's direction). A colour is BACKGROUND + 127.5 times the
# unit direction: all lie on one sphere around the background, so every colour is an
# extreme point of the set and a linear read-out (a patch embedding, a dot-product
# attention query) can single out any one of them; the plain lattice would put grey
# and the other midpoints inside the hull, where no linear function peaks.
_DIRECTIONS = (
    ("red", (1, -1, -1)), ("lime", (-1, 1, -1)), ("blue", (-1, -1, 1)),
    ("yellow", (1, 1, -1)), ("cyan", (-1, 1, 1)), ("magenta", (1, -1, 1)),
    ("white", (1, 1, 1)), ("grey", (-1, -1, -1)),
    ("maroon", (0, -1, -1)), ("green", (-1, 0, -1)), ("navy", (-1, -1, 0)),
    ("olive", (0, 0, -1)), ("teal", (-1, 0, 0)), ("purple", (0, -1, 0)),
    ("orange", (1, 0, -1)), ("rose", (1, -1, 0)), ("chartreuse", (0, 1, -1)),
    ("spring", (-1, 1, 0)), ("azure", (-1, 0, 1)), ("violet", (0, -1, 1)),
    ("salmon", (1, 0, 0)), ("mint", (0, 1, 0)), ("lavender", (0, 0, 1)),
    ("cream", (1, 1, 0)), ("pink", (1, 0, 1)), ("sky", (0, 1, 1)),
)
BACKGROUND = (128, 128, 128)  # empty cells: the sphere's centre, no colour direction


def _on_sphere(d):
  n = float(np.sqrt(sum(x * x for x in d)))
  return tuple(int(round(127.5 + 127.5 * x / n)) for x in d)


PALETTE = tuple((name, _on_sphere(d)) for name, d in _DIRECTIONS)
NAMES = tuple(name for name, _ in PALETTE)

QUESTION = "where does the {} chain end ?"


def num_chains(spec, hops: int) -> int:
  return min(spec.chase_chains, _nodes(spec.grid, spec.chase_colours) // (hops + 1))


def _nodes(grid, colours):
  return min(grid * grid, colours)


def max_hops_for(grid: int, colours: int) -> int:
  """The longest h at which two chains (one named, one distractor) still fit."""
  return _nodes(grid, colours) // 2 - 1


def draw_hops(rng, spec) -> int:
  """h in 1..spec.max_hops; a share `spec.hop_focus` of examples at max_hops exactly.

  The focus keeps a curriculum's newest (hardest) level well represented while the
  easier levels stay in the mix.
  """
  if spec.hop_focus > 0 and rng.random() < spec.hop_focus:
    return spec.max_hops
  return int(rng.integers(1, spec.max_hops + 1))


def generate(rng, spec):
  """One chase example: (scene [n, 6] int32, question, answer, hops)."""
  hops = draw_hops(rng, spec)
  chains = num_chains(spec, hops)
  k = spec.chase_colours
  answer = int(rng.integers(k))
  start = [c for c in range(k) if c != answer][rng.integers(k - 1)]
  others = rng.permutation([c for c in range(k) if c not in (answer, start)]).tolist()
  nodes = chains * (hops + 1)
  decoys = min(spec.chase_decoys, k - nodes, spec.grid * spec.grid - nodes)
  cells = rng.permutation(spec.grid * spec.grid)[:nodes + decoys].tolist()
  rows = []
  for chain in range(chains):
    # Chain 0 is the named one: start and answer at its ends; the rest get fresh colours.
    inner = hops - 1
    colours = ([start] + others[:inner] + [answer] if chain == 0 else others[:hops + 1])
    others = others[inner:] if chain == 0 else others[hops + 1:]
    for j, colour in enumerate(colours):
      cell = cells.pop()
      target = colours[min(j + 1, hops)]             # the end points to itself
      rows.append([colour, scenes.LINK, 1, cell // spec.grid, cell % spec.grid, target])
  # Decoys: lone fixed points (a plain square, like an end) on no chain. Without them
  # "answer the colour of some plain square" scores 1/C, a shortcut that a small model
  # settles on instead of learning the lookup; decoys cut it to 1/(C + decoys).
  for colour in others[:decoys]:
    cell = cells.pop()
    rows.append([colour, scenes.LINK, 1, cell // spec.grid, cell % spec.grid, colour])
  # Rows in random order, so that no tool reading scene[0] mistakes it for the start.
  scene = np.array(rows, np.int32)[rng.permutation(len(rows))]
  return scene, QUESTION.format(NAMES[start]), NAMES[answer], hops


def solve(scene, question):
  """The answer from the scene rows alone, by following pointers (tests, tools)."""
  points_to = {colour: target for colour, _, _, _, _, target in scene.tolist()}
  node = NAMES.index(question.split()[3])
  for _ in range(len(points_to)):
    node = points_to[node]
  return NAMES[node]
