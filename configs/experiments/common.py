"""What the three experiment configs share: everything but the recursion mode."""
from configs import base


def apply_mode(c, mode: str):
  """Sets `c`'s recursion mode and loss kind for an experiment mode, in place.

  Separate from get_config so that studies starting from another task's config
  (configs/experiments/depth.py on configs/chase.py) give each mode the same meaning.
  """
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


def get_config(mode: str, arg=None):
  return apply_mode(base.get_config(arg), mode)


def parse_variant_arg(arg, defaults, variants, where):
  """A study config's 'key=value,...' argument, with `variant` checked against `variants`."""
  args = base.parse_args(arg, defaults, where)
  if args["variant"] not in variants:
    raise ValueError(f"{where}: unknown variant {args['variant']!r}; known: "
                     f"{sorted(variants)}")
  return args
