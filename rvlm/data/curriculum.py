"""A hop-count curriculum: the train stream's maximum h rises with the model's accuracy.

Multi-hop questions are learned with far less data when the longest chains come in
only once the shorter ones are solved (Yao et al. 2025; Wies et al. 2022). Here the
curriculum level is the train split's `max_hops`: it starts at `start` and rises by one
whenever the model answers questions of exactly that many hops (val split, final
depth) with accuracy >= `threshold`, checked every `every` steps, until it reaches
config.data.embedded.max_hops. Easier hops stay in the mix: each level draws h from
1..level, with a share `hop_focus` at the level itself.

Exact resume: each level reads its own grain pipeline (own example stream, own
shuffle), and the iterator state is {level, that pipeline's grain state}; the trainer
stores it in the checkpoint like any grain state. The check runs on fixed val
examples with the current params, so the same run levels up at the same steps.
"""
import copy

from rvlm.data import pipeline


def check_config(config):
  """Validates config.data.curriculum; returns it (None when disabled)."""
  cur = config.data.get("curriculum")
  if cur is None or not cur.enabled:
    return None
  if config.data.name != "embedded":
    raise ValueError(f"config.data.curriculum needs config.data.name='embedded', got "
                     f"{config.data.name!r}")
  top = int(config.data.embedded.max_hops)
  if not isinstance(cur.start, int) or not 1 <= cur.start <= top:
    raise ValueError(f"config.data.curriculum.start={cur.start!r} must be an int in "
                     f"[1, config.data.embedded.max_hops={top}]")
  if not 0 <= float(cur.threshold) <= 1:
    # 0 raises the level at every check: a fixed schedule, one level per `every` steps.
    raise ValueError(f"config.data.curriculum.threshold={cur.threshold!r} must be in [0, 1]")
  for field in ("every", "num_examples"):
    if not isinstance(cur[field], int) or cur[field] < 1:
      raise ValueError(f"config.data.curriculum.{field}={cur[field]!r} must be an int >= 1")
  return cur


def _at_level(config, level):
  c = copy.deepcopy(config)
  c.data.embedded.max_hops = level
  # The probe asks questions of exactly `level` hops: val draws 1..eval_max_hops.
  c.data.embedded.eval_max_hops = level
  return c


class CurriculumIterator:
  """Train batches at the current level; get_state/set_state/close like grain's."""

  def __init__(self, config, process_index=0, process_count=1):
    self.cfg = check_config(config)
    if self.cfg is None:
      raise ValueError("CurriculumIterator needs config.data.curriculum.enabled=True")
    self._config = config
    self._where = (process_index, process_count)
    self.final_level = int(config.data.embedded.max_hops)
    self.level = None
    self._it = None
    self._probe = {}
    self._enter(int(self.cfg.start))

  def _enter(self, level, state=None):
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self.level = level
    self._it = pipeline.build_train_iterator(_at_level(self._config, level), *self._where,
                                             stream=level)
    if state is not None:
      self._it.set_state(state)

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._it)

  def get_state(self):
    return {"curriculum_level": self.level, "iterator": self._it.get_state()}

  def set_state(self, state):
    if not isinstance(state, dict) or "curriculum_level" not in state:
      raise ValueError("the checkpoint's data state has no curriculum level: it was saved "
                       "by a run without config.data.curriculum")
    self._enter(int(state["curriculum_level"]), state["iterator"])

  def close(self):
    if hasattr(self._it, "close"):
      self._it.close()

  def due(self, step):
    return self.level < self.final_level and step % self.cfg.every == 0

  def probe_batches(self, batch_size):
    """Fixed val batches of about num_examples questions of exactly `level` hops."""
    if self.level not in self._probe:
      # val draws h uniformly from 1..level: generate level x as many, keep h == level.
      n = self.cfg.num_examples * self.level
      self._probe[self.level] = pipeline.build_eval_batches(
          _at_level(self._config, self.level), "val", batch_size, n, *self._where,
          only_hops=self.level)
    return self._probe[self.level]

  def update(self, accuracy_at_level):
    """Raises the level when `accuracy_at_level` passes the threshold; True if it did."""
    if self.level < self.final_level and accuracy_at_level >= float(self.cfg.threshold):
      self._enter(self.level + 1)
      return True
    return False
