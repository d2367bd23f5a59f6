"""Matmul FLOPs of a JAX function, counted from its jaxpr.

XLA's cost analysis counts the body of a scan once, so for a model that scans over
layers and recursion steps it under-reports by a factor of L * R. Walking the jaxpr
instead multiplies every scan body by its length, so the count is what the hardware
executes: forward, backward and any rematerialised recomputation.

Only dot_general / conv FLOPs are counted (2 per multiply-add); elementwise work is
a few percent at these shapes and is left out on purpose.
"""
import math

import jax
from jax.extend import core


def _dot_flops(eqn):
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  contract = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * contract


def _conv_flops(eqn):
  rhs = eqn.invars[1].aval
  dn = eqn.params["dimension_numbers"]
  # rhs spec: (out features, in features per group, *spatial).
  per_output = rhs.shape[dn.rhs_spec[1]] * math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
  return 2 * math.prod(eqn.outvars[0].aval.shape) * per_output


def _sub_jaxprs(eqn):
  for p in eqn.params.values():
    for item in (p if isinstance(p, (tuple, list)) else (p,)):
      if isinstance(item, core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, core.Jaxpr):
        yield item


def jaxpr_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "cond":
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    elif name == "while":
      # Trip count is data dependent; rvlm's models do not use while loops, so
      # refuse rather than report a silently wrong number.
      raise ValueError("jaxpr_flops: while loops have no static trip count")
    else:
      total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn))
  return total


def count_flops(fn, *args, **kwargs) -> int:
  """Matmul FLOPs of one call of `fn(*args, **kwargs)` (arrays or ShapeDtypeStructs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
