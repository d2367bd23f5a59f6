"""The embedded multi-hop visual QA dataset: a random-access source, no files.

Example i of a split is a pure function of (seed, split, i): its numpy Generator is
seeded from SeedSequence([seed, split_id, i]) and no global RNG is touched, so any
process (a grain worker, a test subprocess, the tfds builder) renders the same bytes.
Splits use different split_ids, i.e. disjoint seed streams. `test_comp` scenes name
objects whose (colour, shape) pair is held out of every train/val/test scene.
"""
import numpy as np

from rvlm.data import chase
from rvlm.data import families
from rvlm.data import scenes

SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "test_comp": 3}
NO_SHAPES = ("pointer", "chase")  # families without nameable shapes: not in test_comp


def _names(value, field):
  """A tuple/list of names, or one comma-separated string (CLI friendly)."""
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  try:
    return tuple(str(v).strip() for v in value)
  except TypeError:
    raise ValueError(f"config.data.embedded.{field} must be a list of names") from None


def make_spec(ecfg, image_size: int, patch_size: int, comp: bool,
              split: str = "train") -> families.Spec:
  """Validates config.data.embedded and returns the generator Spec of `split`.

  Train draws h from 1..max_hops (with a share `hop_focus` at max_hops: a curriculum
  moves max_hops); val and test draw h uniformly from 1..eval_max_hops (0: max_hops),
  so one eval split measures hop counts beyond the trained ones.
  """
  grid = scenes.grid_size(image_size, patch_size)
  def field_range(name, lo, hi):
    v = ecfg[name]
    if not isinstance(v, int) or not lo <= v <= hi:
      raise ValueError(f"config.data.embedded.{name}={v!r} must be an int in [{lo}, {hi}]")
    return v
  num_colours = field_range("num_colours", 4, len(scenes.COLOURS))  # chain3: 4
  num_shapes = field_range("num_shapes", 2, len(scenes.SHAPES))
  cells = grid * grid
  max_objects = field_range("max_objects", 2, min(num_colours, cells))
  min_objects = field_range("min_objects", 1, max_objects)
  names = _names(ecfg.families, "families")
  # Arrows need a distinct colour per hop; chase needs two chains of distinct colours.
  chase_colours = ecfg.get("chase_colours", len(chase.PALETTE))
  chase_chains = ecfg.get("chase_chains", 3)
  chase_decoys = ecfg.get("chase_decoys", 0)
  hop_bound = cells
  if "pointer" in names:
    hop_bound = min(hop_bound, min(num_colours, cells) - 1)
  if "chase" in names:
    chase_colours = field_range("chase_colours", 4, len(chase.PALETTE))
    chase_chains = field_range("chase_chains", 2, len(chase.PALETTE) // 2)
    chase_decoys = field_range("chase_decoys", 0, len(chase.PALETTE))
    hop_bound = min(hop_bound, chase.max_hops_for(grid, chase_colours))
    if patch_size < 4:
      raise ValueError(f"config.model.vit.patch_size={patch_size}: a chase node needs at "
                       "least 4 px per cell (a ring and a core)")
  max_hops = field_range("max_hops", 1, hop_bound)
  eval_max_hops = field_range("eval_max_hops", 0, hop_bound) if "eval_max_hops" in ecfg else 0
  hop_focus = ecfg.get("hop_focus", 0.0)
  if not isinstance(hop_focus, (int, float)) or not 0 <= hop_focus <= 1:
    raise ValueError(f"config.data.embedded.hop_focus={hop_focus!r} must be in [0, 1]")
  if split in ("val", "test") and eval_max_hops:
    max_hops, hop_focus = eval_max_hops, 0.0
  max_count = field_range("max_count", 1, min(num_colours, cells) - 1)
  if max_count >= max_objects:
    raise ValueError(f"config.data.embedded.max_count={max_count} must be below "
                     f"max_objects={max_objects} (the scene also holds a distractor)")
  if grid < 2:
    raise ValueError(f"the embedded scenes need a grid of at least 2x2 cells; got "
                     f"image_size/patch_size = {grid}")
  heldout = []
  for pair in _names(ecfg.heldout_pairs, "heldout_pairs"):
    parts = pair.split()
    if (len(parts) != 2 or parts[0] not in scenes.COLOUR_NAMES[:num_colours] or
        parts[1] not in scenes.SHAPES[:num_shapes]):
      raise ValueError(
          f"config.data.embedded.heldout_pairs: {pair!r} is not 'colour shape' with "
          f"colour in {scenes.COLOUR_NAMES[:num_colours]} and shape in "
          f"{scenes.SHAPES[:num_shapes]}")
    heldout.append((scenes.COLOUR_NAMES.index(parts[0]), scenes.SHAPES.index(parts[1])))
  if not heldout:
    raise ValueError("config.data.embedded.heldout_pairs must name at least one pair "
                     "(the test_comp split is built from them)")
  allowed = np.ones((num_colours, num_shapes), bool)
  for c, s in heldout:
    allowed[c, s] = False
  # Every shape must keep enough partner colours for the counted objects and chains,
  # every colour at least one shape, or a scene could not be built.
  for s in range(num_shapes):
    if allowed[:, s].sum() < max(max_count, 2) + 1:
      raise ValueError(f"config.data.embedded.heldout_pairs leaves shape "
                       f"{scenes.SHAPES[s]!r} too few colours")
  for c in range(num_colours):
    if not allowed[c].any():
      raise ValueError(f"config.data.embedded.heldout_pairs leaves colour "
                       f"{scenes.COLOUR_NAMES[c]!r} no shape")
  if len({c for c, _ in heldout}) < 2:
    raise ValueError("config.data.embedded.heldout_pairs must use at least 2 colours")
  return families.Spec(
      grid=grid, num_colours=num_colours, num_shapes=num_shapes,
      min_objects=min_objects, max_objects=max_objects, max_hops=max_hops,
      max_count=max_count, allowed=np.ones_like(allowed) if comp else allowed,
      heldout=tuple(heldout), comp=comp, chase_chains=int(chase_chains),
      chase_colours=int(chase_colours), chase_decoys=int(chase_decoys),
      hop_focus=float(hop_focus) if split == "train" else 0.0)


def family_weights(ecfg, split: str):
  """(names, probabilities) of the families drawn in a split."""
  names = _names(ecfg.families, "families")
  for n in names:
    if n not in families.FAMILIES:
      raise ValueError(f"config.data.embedded.families: unknown family {n!r}; known: "
                       f"{families.FAMILIES}")
  if not names:
    raise ValueError("config.data.embedded.families must not be empty")
  try:
    weights = tuple(float(w) for w in _names(ecfg.family_weights, "family_weights"))
  except ValueError:
    raise ValueError(f"config.data.embedded.family_weights={ecfg.family_weights!r} "
                     "must be numbers") from None
  weights = weights or (1.0,) * len(names)
  if len(weights) != len(names) or min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f"config.data.embedded.family_weights={weights} must be empty or "
                     f"one non-negative weight per family {names}")
  if split == "test_comp":
    # Arrows and chase nodes have no nameable shape, so no held-out pair can appear
    # in their scenes; test_comp covers the other families.
    keep = [k for k, n in enumerate(names) if n not in NO_SHAPES]
    if not keep:
      raise ValueError(f"test_comp needs a family other than {NO_SHAPES}")
    names = tuple(names[k] for k in keep)
    weights = tuple(weights[k] for k in keep)
  p = np.asarray(weights, np.float64)
  return names, p / p.sum()


class EmbeddedSource:
  """grain random-access source: __len__ and __getitem__(i) -> record dict.

  Records: image uint8 [S, S, 3], turns ((question, answer),), family (global
  index into families.ALL_FAMILIES), hops, scene int32 [n, 6] (for tests/tools),
  origin (for error messages). Picklable, so grain workers rebuild nothing.
  """

  def __init__(self, ecfg, *, image_size, patch_size, seed, split, stream=0):
    if split not in SPLIT_IDS:
      raise ValueError(f"embedded split {split!r} unknown; choose from {sorted(SPLIT_IDS)}")
    self.split = split
    self.image_size = image_size
    self.spec = make_spec(ecfg, image_size, patch_size, comp=split == "test_comp",
                          split=split)
    self.names, self.probs = family_weights(ecfg, split)
    size = {"train": ecfg.num_train, "val": ecfg.num_val, "test": ecfg.num_test,
            "test_comp": ecfg.num_test}[split]
    if not isinstance(size, int) or size <= 0:
      raise ValueError(f"config.data.embedded.num_{split.split('_')[0]}={size!r} must "
                       "be a positive int")
    self._len = size
    self._seed = int(seed)
    # A curriculum level reads its own stream (see curriculum.py); 0 is the plain one.
    self._stream = int(stream)

  def __len__(self):
    return self._len

  def __repr__(self):
    return f"EmbeddedSource(split={self.split!r}, len={self._len})"

  def text(self, i: int):
    """Generates example i without rendering: (scene, question, answer, family, hops)."""
    if not 0 <= i < self._len:
      raise IndexError(f"index {i} out of range for {self!r}")
    key = [self._seed, SPLIT_IDS[self.split], int(i)] + ([self._stream] if self._stream else [])
    rng = np.random.default_rng(key)
    name = self.names[rng.choice(len(self.names), p=self.probs)]
    scene, q, a, hops = families.generate(name, rng, self.spec)
    return scene, q, a, families.ALL_FAMILIES.index(name), hops

  def __getitem__(self, i):
    i = int(i)
    scene, q, a, family, hops = self.text(i)
    return dict(
        image=scenes.render(scene, self.image_size, self.spec.grid),
        turns=((q, a),), family=family, hops=hops, scene=scene,
        origin=f"embedded/{self.split}[{i}]")
