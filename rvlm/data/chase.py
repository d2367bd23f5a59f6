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
its own colour of the chase palette (PALETTE: 26 colours, the corners and midpoints of
the RGB cube), on random cells. The question names a chain by its start colour; the
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
Scene rows use the embedded layout (colour, shape, size, row, col, direction) with
shape = scenes.LINK, colour = the node's PALETTE index and direction = the PALETTE
index of the node it points to.
"""
import numpy as np

from rvlm.data import scenes

# Named by the usual web names; the first eight are the most distinct.
PALETTE = (
    ("red", (255, 0, 0)), ("lime", (0, 255, 0)), ("blue", (0, 0, 255)),
    ("yellow", (255, 255, 0)), ("cyan", (0, 255, 255)), ("magenta", (255, 0, 255)),
    ("white", (255, 255, 255)), ("grey", (128, 128, 128)),
    ("maroon", (128, 0, 0)), ("green", (0, 128, 0)), ("navy", (0, 0, 128)),
    ("olive", (128, 128, 0)), ("teal", (0, 128, 128)), ("purple", (128, 0, 128)),
    ("orange", (255, 128, 0)), ("rose", (255, 0, 128)), ("chartreuse", (128, 255, 0)),
    ("spring", (0, 255, 128)), ("azure", (0, 128, 255)), ("violet", (128, 0, 255)),
    ("salmon", (255, 128, 128)), ("mint", (128, 255, 128)), ("lavender", (128, 128, 255)),
    ("cream", (255, 255, 128)), ("pink", (255, 128, 255)), ("sky", (128, 255, 255)),
)
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
  cells = rng.permutation(spec.grid * spec.grid)[:chains * (hops + 1)].tolist()
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
