"""The R-step recursion over one shared decoder stack.

Modes (config.model.recursion.mode):
  none      standard transformer: one step (R must be 1).
  vanilla   E_(r+1) = H_L^(r): the final layer output fed straight back.
  connector RecursiveVLM: E_(r+1) from the Recursive Connector.

`impl='scan'` runs the steps under an outer `nn.scan` with the params broadcast (one
copy, compile time flat in R); `impl='loop'` calls the same bound submodule R times.
`remat=True` wraps each step in jax.checkpoint (training memory flat in R).
Both build the identical param tree (`step/stack/...`, `step/connector/...`) and give
equal outputs; no params are ever duplicated across steps.
"""

import flax.linen as nn
import jax.numpy as jnp

from rvlm.models.connector import Connector
from rvlm.models.decoder import DecoderStack

MODES = ("none", "vanilla", "connector")
IMPLS = ("scan", "loop")


class RecursionStep(nn.Module):
  """One recursion step: the full decoder stack, then the transition to the next input."""
  mode: str
  stack_kwargs: dict
  connector_kwargs: dict

  @nn.compact
  def __call__(self, e_prev, e0, mask, positions, kv_cache=None, cache_index=None,
               num_image_tokens=None):
    """Returns (next input, (final-layer output, this step's input)).

    For decoding (rvlm/decode.py), `kv_cache` is this step's per-layer cache (see
    DecoderStack), `num_image_tokens` how many leading positions of e_prev are image
    tokens (the connector's modality split), and the updated cache is a third output.
    """
    num_sampled = self.connector_kwargs["num_layers"] if self.mode == "connector" else 0
    out = DecoderStack(**self.stack_kwargs, num_sampled=num_sampled, name="stack")(
        e_prev, mask, positions, kv_cache, cache_index)
    h, sampled = out[:2]
    if self.mode == "connector":
      e_next = Connector(**self.connector_kwargs, name="connector")(sampled, e0, e_prev,
                                                                  num_image_tokens)
    else:  # vanilla (and none, whose single step never uses it)
      e_next = h
    # Outputs per step: the final-layer output (read by the shared head) and this
    # step's input (for diagnostics: norms, CKA with E_0).
    if kv_cache is None:
      return e_next, (h, e_prev)
    return e_next, (h, e_prev), out[2]


class Recursion(nn.Module):
  mode: str
  num_steps: int
  impl: str
  stack_kwargs: dict
  connector_kwargs: dict
  remat: bool = False

  @nn.compact
  def __call__(self, e0, mask, positions, num_steps: int | None = None):
    """Returns (hidden [R, B, N, d] final-layer output per step, step inputs [R, B, N, d])."""
    steps = self.num_steps if num_steps is None else num_steps
    if steps < 1 or (self.mode == "none" and steps != 1):
      raise ValueError(f"num_steps={steps} is invalid for recursion mode {self.mode!r}")
    kwargs = dict(mode=self.mode, stack_kwargs=self.stack_kwargs,
                  connector_kwargs=self.connector_kwargs, name="step")
    # Under remat the backward pass saves each step's inputs (e_prev; e0, mask and
    # positions are shared) and recomputes the step's activations from them. Inside a
    # scan XLA cannot CSE the recomputation away, so the barrier is only needed unrolled.
    step_cls = (nn.remat(RecursionStep, prevent_cse=self.impl != "scan") if self.remat
                else RecursionStep)
    if self.impl == "scan":
      scanned = nn.scan(step_cls, variable_broadcast="params",
                        split_rngs={"params": False},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=steps)
      _, (hidden, inputs) = scanned(**kwargs)(e0, e0, mask, positions)
      return hidden, inputs
    step = step_cls(**kwargs)
    e, hs, es = e0, [], []
    for _ in range(steps):
      e, (h, e_in) = step(e, e0, mask, positions)
      hs.append(h)
      es.append(e_in)
    return jnp.stack(hs), jnp.stack(es)
