"""Grid scenes: objects on a grid aligned with the ViT patches, and their rendering.

One object per grid cell and one cell per patch, so each image token sees exactly one
object. An earlier attempt with free positions and Euclidean relations taught a small
model perception but not the relations; grid-aligned objects make "right of" a fixed
offset between image tokens, which a small transformer learns quickly and composes.

A scene is an int32 array [n, 6] with one row per object:
  (colour, shape, size, row, col, direction)
`shape == ARROW` marks an arrow (pointer family) whose `direction` indexes DIRECTIONS;
`shape == LINK` marks a chase-family node whose colour and `direction` index the chase
palette (chase.PALETTE): its own colour and that of the node it points to; other
objects have direction -1. Named colours are unique within a scene so that a colour
names one object.
"""
import numpy as np
from PIL import Image, ImageDraw

# Colour names and RGB values, chosen far apart so an 8x8 patch tells them apart.
COLOURS = (
    ("red", (230, 30, 30)),
    ("green", (30, 190, 40)),
    ("blue", (40, 80, 255)),
    ("yellow", (245, 235, 30)),
    ("purple", (150, 50, 220)),
    ("orange", (255, 140, 0)),
    ("cyan", (30, 225, 235)),
    ("white", (250, 250, 250)),
    ("pink", (255, 130, 200)),
    ("brown", (130, 75, 25)),
    ("grey", (128, 128, 128)),
)
COLOUR_NAMES = tuple(name for name, _ in COLOURS)
SHAPES = ("square", "circle", "triangle", "diamond")
SIZES = ("small", "large")
ARROW = len(SHAPES)  # shape index of arrows (pointer family); not a nameable shape
LINK = ARROW + 1     # shape index of chase-family nodes (chase.py); not nameable

# Grid moves as (d_row, d_col); row 0 is the top of the image.
DIRECTIONS = ("up", "down", "left", "right")
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))

# Fractions of the cell taken by a large / small object. A 1-pixel gap (at 8 px
# cells) keeps neighbouring objects from merging.
_EXTENT = {0: 0.625, 1: 0.875}

COLOUR, SHAPE, SIZE, ROW, COL, DIR = range(6)


def grid_size(image_size: int, patch_size: int) -> int:
  """Cells per side; the grid must tile the image exactly with patch-sized cells."""
  if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
    raise ValueError(
        f"config.model.vit.image_size={image_size} must be a positive multiple of "
        f"config.model.vit.patch_size={patch_size}: the embedded scenes put one object "
        "per patch.")
  return image_size // patch_size


def render(scene: np.ndarray, image_size: int, grid: int) -> np.ndarray:
  """Draws `scene` on a black image; returns uint8 [image_size, image_size, 3]."""
  cell = image_size // grid
  # Chase scenes sit on the centre of their colour sphere (chase.BACKGROUND).
  links = len(scene) and (scene[:, SHAPE] == LINK).any()
  img = Image.new("RGB", (image_size, image_size), _chase_background() if links else (0, 0, 0))
  draw = ImageDraw.Draw(img)
  for colour, shape, size, row, col, direction in scene.tolist():
    if shape == LINK:
      _draw_link(draw, cell, row, col, colour, direction)
      continue
    rgb = COLOURS[colour][1]
    ext = max(2, round(_EXTENT[size] * cell))
    x0 = col * cell + (cell - ext) // 2
    y0 = row * cell + (cell - ext) // 2
    x1, y1 = x0 + ext - 1, y0 + ext - 1
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == 0:  # square
      draw.rectangle([x0, y0, x1, y1], fill=rgb)
    elif shape == 1:  # circle
      draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif shape == 2:  # triangle, apex up
      draw.polygon([(xm, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif shape == 3:  # diamond
      draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=rgb)
    else:  # arrow: a wedge whose apex points at the neighbouring cell
      apex, base = {
          0: ((xm, y0), [(x0, y1), (xm, ym + (y1 - ym) / 2), (x1, y1)]),
          1: ((xm, y1), [(x1, y0), (xm, y0 + (ym - y0) / 2), (x0, y0)]),
          2: ((x0, ym), [(x1, y1), (x1 - (x1 - xm) / 2, ym), (x1, y0)]),
          3: ((x1, ym), [(x0, y0), (x0 + (xm - x0) / 2, ym), (x0, y1)]),
      }[direction]
      draw.polygon([apex, base[0], base[1], base[2]], fill=rgb)
  return np.asarray(img, dtype=np.uint8)


def _chase_background():
  from rvlm.data import chase  # pylint: disable=g-import-not-at-top  (chase imports scenes)
  return chase.BACKGROUND


def _draw_link(draw, cell, row, col, colour, target):
  """A chase node: a ring of its own colour around a core of its target's (chase.py)."""
  from rvlm.data import chase  # pylint: disable=g-import-not-at-top  (chase imports scenes)
  ring = max(1, cell // 4)
  if cell - 2 * ring < 1:
    raise ValueError(f"chase cells of {cell} px cannot hold a ring and a core")
  x0, y0 = col * cell, row * cell
  draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=chase.PALETTE[colour][1])
  draw.rectangle([x0 + ring, y0 + ring, x0 + cell - 1 - ring, y0 + cell - 1 - ring],
                 fill=chase.PALETTE[target][1])


def self_avoiding_path(rng: np.random.Generator, grid: int, hops: int):
  """A random path of `hops` unit moves visiting distinct cells, built directly.

  Depth-first search with randomly ordered moves: every returned path is valid by
  construction (no rejection of finished samples), and the search always succeeds
  when hops < grid*grid because a Hamiltonian-style snake exists from any start.
  Returns (cells [hops+1, 2], moves [hops]).
  """
  if hops >= grid * grid:
    raise ValueError(f"cannot walk {hops} hops on a {grid}x{grid} grid")
  start = (int(rng.integers(grid)), int(rng.integers(grid)))
  cells, moves = [start], []

  def extend():
    if len(moves) == hops:
      return True
    r, c = cells[-1]
    for m in rng.permutation(4).tolist():
      nr, nc = r + MOVES[m][0], c + MOVES[m][1]
      if 0 <= nr < grid and 0 <= nc < grid and (nr, nc) not in cells:
        cells.append((nr, nc))
        moves.append(m)
        if extend():
          return True
        cells.pop()
        moves.pop()
    return False

  if not extend():
    # Only reachable from starts that trap every walk of this length; restart from
    # the top-left corner, from which a boustrophedon covers the whole grid.
    cells[:] = [(0, 0)]
    moves.clear()
    extend()
  return np.array(cells, dtype=np.int32), np.array(moves, dtype=np.int32)
