"""What the three experiment configs share: everything but the recursion mode."""
from configs import base


def get_config(mode: str, arg=None):
  c = base.get_config(arg)
  rec, loss = c.model.recursion, c.loss
  if mode == "standard":
    rec.mode, rec.num_steps = "none", 1
  elif mode == "vanilla":
    # The vanilla recursive baseline is trained on its final step only (method.md).
    rec.mode, loss.kind = "vanilla", "final_only"
  elif mode == "rvlm":
    rec.mode, loss.kind = "connector", "monotonic"
  else:
    raise ValueError(f"unknown experiment mode {mode!r}")
  return c
