"""benchmarks/torch_reference.py against rvlm: the same loss on the same params and batch,
and the same params after the same optimizer steps (clip, AdamW, decay masks, freeze).

Measured on the 2-core CPU (float32, 2026-12-02): losses agree to a relative 0 -
1.5e-7 (tolerance 1e-5), also after two of rvlm's train steps (2.3e-7); params after
two optimizer steps on the same gradients to 1.2e-7 absolute (tolerance 1e-6, moves of
up to 2.8e-3).
"""
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
import ml_collections
import numpy as np
import optax
import pytest

torch = pytest.importorskip(
    "torch", reason="the PyTorch reference needs torch: pip install -e '.[oracle]'")

from benchmarks import torch_reference as tr  # noqa: E402
from configs import base  # noqa: E402
from rvlm import losses  # noqa: E402
from rvlm import optim  # noqa: E402
from rvlm import steps  # noqa: E402
from rvlm import train  # noqa: E402
from rvlm.models import vlm  # noqa: E402

LOSS_RTOL = 1e-5


def _config(mode="connector", num_steps=3, **model_overrides):
  c = base.get_config("preset=tiny")
  c.model.recursion.update(mode=mode, num_steps=num_steps)
  c.data.seq_len = 8
  for path, value in model_overrides.items():  # 'connector__base' -> model.connector.base
    *parents, leaf = path.split("__")
    node = c.model
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _batch(c, b=4, seed=0):
  """benchmarks/train_step.py:synthetic_batch's layout, plus text padding in example 0
  and no image in example 1 (fully masked query rows, which rvlm attends uniformly)."""
  rng = np.random.default_rng(seed)
  s, t = c.model.vit.image_size, c.data.seq_len
  mask_ar = np.zeros((b, t), np.int32)
  mask_ar[:, t // 2:] = 1
  input_mask = np.ones((b, t), np.int32)
  input_mask[0, -2:] = 0
  image_mask = np.ones((b,), np.int32)
  image_mask[1] = 0
  return {"image": rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
          "image_mask": image_mask,
          "tokens": rng.integers(1, c.model.vocab_size, (b, t)).astype(np.int32),
          "input_mask": input_mask, "mask_ar": mask_ar, "mask_loss": mask_ar * input_mask}


def _random_params(c, seed=1):
  """Seeded random values in rvlm's param tree for `c` (the tree and shapes from
  jax.eval_shape of rvlm's own init, which compiles nothing, unlike the init itself):
  kernels N(0, 0.2), norm scales and alpha 1 + N(0, 0.1). rvlm's init sets the
  connector projections to zero and every scale / bias / alpha to 1 or 0, which would
  hide a mismatch in them (or a layer-indexing slip) from the loss."""
  model = vlm.make_model(c.model)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), train.dummy_batch(c, 1))
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    if path[-1].key in ("scale", "norm_scale", "alpha"):
      return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    return (0.2 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(shapes["params"]))


@functools.lru_cache(maxsize=None)
def _setup():
  """(params, batch, rvlm's loss) of `_config()`, configs/base.py's options at the tiny
  shape; cached, callers must not modify them."""
  c = _config()
  params, batch = _random_params(c), _batch(c)
  return params, batch, tr.rvlm_loss(c, params, batch)


def _torch_model(c, params):
  model = tr.TorchVLM(c.model)
  tr.load_params(model, params)
  return model


# configs/base.py's options (connector, R = 3) are checked by the first step of
# test_train_steps_match_rvlm; these are the other modes and options.
@pytest.mark.parametrize("mode,num_steps,overrides", [
    # Vanilla recursion with the other projector / mask / head / ViT options.
    ("vanilla", 2, (("projector__kind", "linear"), ("attention", "causal"),
                    ("tie_embeddings", False), ("vit__final_norm", False))),
    # The connector's other base / alpha / modality options, k = 3 of 4 layers.
    ("connector", 2, (("connector__base", "prev"), ("connector__alpha_shape", "scalar"),
                      ("connector__modality_specific", False), ("connector__num_layers", 3),
                      ("projector__act", "gelu"))),
])
def test_loss_matches_rvlm(mode, num_steps, overrides):
  c = _config(mode, num_steps, **dict(overrides))
  params, batch = _random_params(c), _batch(c)
  expected = tr.rvlm_loss(c, params, batch)
  got = tr.loss_fn(_torch_model(c, params), tr.to_torch_batch(batch), c.loss).item()
  # Measured: relative differences 1.5e-7 and 0 (float32 rounding).
  np.testing.assert_allclose(got, expected, rtol=LOSS_RTOL)


@pytest.mark.parametrize("kind,form", [("monotonic", "hard"), ("monotonic", "soft"),
                                       ("final_only", "hard")])
def test_recursion_loss_and_its_gradient_match_rvlm(kind, form):
  """On random per-token losses; the gradient checks where the stop-gradients are."""
  rng = np.random.default_rng(0)
  tok = rng.uniform(0, 3, (3, 4, 7)).astype(np.float32)
  mask = (rng.uniform(size=(4, 7)) > 0.3).astype(np.float32)
  opts = dict(kind=kind, beta=2.5, form=form, gamma=0.7, step_weights=(0.5, 1.0, 2.0))
  fn = lambda t: losses.recursion_loss(t, jnp.asarray(mask), **opts)[0]  # noqa: E731
  expected, expected_grad = jax.value_and_grad(fn)(jnp.asarray(tok))
  tok_t = torch.from_numpy(tok).requires_grad_()
  got = tr.recursion_loss(tok_t, torch.from_numpy(mask), **opts)
  got.backward()
  np.testing.assert_allclose(got.item(), float(expected), rtol=1e-6)
  np.testing.assert_allclose(tok_t.grad.numpy(), expected_grad, rtol=1e-6, atol=1e-7)


def test_lr_schedule_matches_rvlm():
  for schedule, warmup in [("cosine", 5), ("cosine", 0), ("constant", 3)]:
    c = ml_collections.ConfigDict(dict(base.get_config().optim, schedule=schedule,
                                       warmup_steps=warmup))
    fn = optim.make_schedule(c, 20)
    for step in (0, 1, 4, 5, 6, 12, 20, 25):
      np.testing.assert_allclose(tr.lr_at(c, 20, step), float(fn(step)), rtol=1e-6, atol=1e-12)


def _optim_config(c):
  """configs/base.py's optimizer made to matter within two steps: lr 1e-3 from step 0
  (no warmup), a weight decay at which a wrong no_decay mask moves a param by
  lr * wd * |p| ~ 1e-4 >> the tolerances, a clip norm the gradients exceed, a frozen
  param."""
  c.optim.update(lr=1e-3, warmup_steps=0, weight_decay=0.5, grad_clip=0.5,
                 freeze=(r".*pos_embedding$",))
  c.train.total_steps = 10
  return c


def _flat(tree):
  return {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_optimizer_matches_optax():
  """The same gradients through rvlm's optax chain and the reference's AdamW, twice.

  Same inputs, so the params agree to float32 rounding (measured: 1.2e-7, one ulp
  near 1). From model gradients they would not at this tolerance: Adam divides each
  gradient by its own RMS, so the float32 rounding noise of a near-zero gradient (e.g.
  the ViT's key bias, whose exact gradient is 0: softmax ignores a per-query shift)
  becomes a move of up to lr in either framework.
  """
  c = _optim_config(_config())
  params, _, _ = _setup()
  tx, _ = optim.make_optimizer(c.optim, c.train.total_steps)
  torch_model = _torch_model(c, params)
  opt = tr.AdamW(torch_model, c.optim, c.train.total_steps)
  by_path = {tr.flax_path(n): p for n, p in torch_model.named_parameters()}
  rng = np.random.default_rng(2)
  update = jax.jit(tx.update)
  state, jparams = tx.init(params), params
  for _ in range(2):
    grads = jax.tree.map(lambda x: rng.normal(0, 0.05, np.shape(x)).astype(np.float32), params)
    updates, state = update(grads, state, jparams)
    jparams = optax.apply_updates(jparams, updates)
    opt.zero_grad()
    for key, g in _flat(grads).items():
      if by_path[key].requires_grad:
        by_path[key].grad = torch.from_numpy(g.copy())
    opt.step()
  assert opt.grad_norm.item() > c.optim.grad_clip  # clipping is exercised
  got, want = tr.params_as_numpy(torch_model), _flat(jparams)
  for key, p in want.items():
    np.testing.assert_allclose(got[key], p, rtol=0, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(got["vit/pos_embedding"], params["vit"]["pos_embedding"])


def test_train_steps_match_rvlm():
  """rvlm's jitted train step against the reference's, twice from the same params: the
  loss before each update and after both (which reads every updated param). lr is kept
  at 1e-3: the noise moves of near-zero gradients (test_optimizer_matches_optax) scale
  with it, and at 1e-2 they alone moved the step-3 loss by 3e-5 (relative)."""
  c = _optim_config(_config())
  params, batch, expected = _setup()
  model = vlm.make_model(c.model)
  tx, schedule = optim.make_optimizer(c.optim, c.train.total_steps)
  step_fn = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                      lr_schedule=schedule, loss_cfg=c.loss))
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.PRNGKey(0)}
  rvlm_losses = []
  for _ in range(2):
    state, metrics = step_fn(state, batch)
    rvlm_losses.append(float(metrics["loss"].compute()))
  rvlm_losses.append(tr.rvlm_loss(c, state["params"], batch))

  torch_model = _torch_model(c, params)
  opt = tr.AdamW(torch_model, c.optim, c.train.total_steps)
  tbatch = tr.to_torch_batch(batch)
  torch_losses = [tr.train_step(torch_model, opt, tbatch, c.loss).item() for _ in range(2)]
  torch_losses.append(tr.loss_fn(torch_model, tbatch, c.loss).item())

  # Step 1's loss is that of the initial params: the forward parity check of
  # configs/base.py's options. Measured relative differences: 0, 0, 2.3e-7.
  np.testing.assert_allclose(torch_losses[0], expected, rtol=LOSS_RTOL)
  np.testing.assert_allclose(torch_losses, rvlm_losses, rtol=LOSS_RTOL)
  assert torch_losses[2] < torch_losses[0]  # the updates did something


def test_time_train_checks_parity_before_timing():
  c = _config()
  params, batch, expected = _setup()
  timing = tr.time_train(c, 4, iters=1, compile=False, threads=1, batch=batch, params=params,
                         expected_loss=expected, warmup=1)
  assert timing.error is None and timing.examples_per_s > 0
  assert timing.loss_rel_diff <= 1e-5
  with pytest.raises(tr.ParityError):
    tr.time_train(c, 4, iters=1, compile=False, threads=1, batch=batch, params=params,
                  expected_loss=expected * 1.01)


def test_time_train_reports_a_compile_failure(monkeypatch):
  def failing_compile(fn):
    def run(*args, **kwargs):
      raise RuntimeError("backend failed")
    return run
  monkeypatch.setattr(torch, "compile", failing_compile)
  c = _config()
  params, batch, expected = _setup()
  timing = tr.time_train(c, 4, iters=1, compile=True, threads=1, batch=batch, params=params,
                         expected_loss=expected)
  assert timing.error == "torch.compile failed: RuntimeError: backend failed"
  assert np.isnan(timing.examples_per_s)


def test_unsupported_options_raise():
  for overrides in (dict(decoder__qk_norm=True), dict(vit__logit_scale="learned"),
                    dict(connector__projection="mlp"), dict(connector__fusion="softmax"),
                    dict(decoder__qkv_bias=True), dict(dtype="bfloat16")):
    with pytest.raises(NotImplementedError):
      tr.TorchVLM(_config(**overrides).model)
