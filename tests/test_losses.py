"""Tests for rvlm.losses against a plain-numpy reference written from method.md.

The reference below follows the "Monotonic Recursion Loss" section of method.md with
explicit loops over steps and tokens, in float64:
  w_i^(r) = beta if r > 1 and l_i^(r) > l_i^(r-1) else 1   (a tie is not a rise)
  L = sum_r lambda_r * sum_i m_i w_i^(r) l_i^(r) / sum_i m_i
  soft: the step-r term is l^(r) + gamma * SiLU(l^(r) - l^(r-1)) (no penalty at r = 1).
A mean over zero supervised tokens is defined as 0.

Tolerances: rvlm computes in float32, the reference in float64 on the same
float32-representable inputs, so rise/tie decisions are identical and only rounding
differs. Loss values and the hard-form gradients use rtol 1e-6; anything going through
exp/log (soft penalty, cross-entropy) uses rtol 1e-5 with a small atol.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base as base_config
from rvlm import losses

# Jitted once per static combination; beta and gamma stay traced so the beta sweep reuses
# one compilation.
_loss = jax.jit(losses.recursion_loss, static_argnames=("kind", "form", "step_weights"))


def _loss_total(token_losses, mask, **kw):
  return _loss(token_losses, mask, **kw)[0]


_grad = jax.jit(jax.grad(_loss_total), static_argnames=("kind", "form", "step_weights"))


# ----------------------------------------------------------------------------------------
# The numpy reference (float64, loops, from the definition).
# ----------------------------------------------------------------------------------------

def _silu(x):
  return x / (1.0 + math.exp(-x))


def _silu_grad(x):
  s = 1.0 / (1.0 + math.exp(-x))
  return s * (1.0 + x * (1.0 - s))


def ref_recursion_loss(token_losses, mask, kind="monotonic", beta=2.0, form="hard",
                       gamma=1.0, step_weights=()):
  """Returns (total, loss_per_step [R], regressions [R]) as float64 numpy."""
  l = np.asarray(token_losses, np.float64)
  num_steps = l.shape[0]
  l = l.reshape(num_steps, -1)
  m = np.asarray(mask, np.float64).reshape(-1)
  lam = list(step_weights) if len(step_weights) else [1.0] * num_steps
  n = sum(m[i] for i in range(m.size) if m[i] != 0)

  per_step, regressions, terms = [], [], []
  for r in range(num_steps):
    plain = weighted = rises = 0.0
    for i in range(m.size):
      if m[i] == 0:
        continue
      rose = r > 0 and l[r, i] > l[r - 1, i]
      plain += l[r, i]
      rises += float(rose)
      if form == "hard":
        weighted += (beta if rose else 1.0) * l[r, i]
      else:
        weighted += l[r, i] + (gamma * _silu(l[r, i] - l[r - 1, i]) if r > 0 else 0.0)
    per_step.append(plain / n if n else 0.0)
    regressions.append(rises / n if n else 0.0)
    terms.append(lam[r] * (weighted / n if n else 0.0))
  total = per_step[-1] if kind == "final_only" else sum(terms)
  return total, np.array(per_step), np.array(regressions)


def ref_token_cross_entropy(logits, target):
  """One position: -log softmax(logits)[target], in float64."""
  z = np.asarray(logits, np.float64)
  zmax = z.max()
  return -(z[target] - zmax - math.log(sum(math.exp(v - zmax) for v in z)))


# ----------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------

# [R=3, B=2, T=4]. All values are exact in float32 (0.1 only sits on a masked-out slot).
# Step 2 vs 1: rises at (0,2) and (1,0); ties at (0,1), (1,1); rise at (0,3) is masked.
# Step 3 vs 2: rises at (0,1), (1,1), (1,3); ties at (0,0), (1,2).
HAND_LOSSES = np.array([
    [[2.0, 1.5, 0.5, 3.0], [1.0, 0.25, 4.0, 2.5]],
    [[1.0, 1.5, 0.75, 3.5], [1.25, 0.25, 3.0, 2.0]],
    [[1.0, 2.0, 0.5, 0.1], [0.5, 0.5, 3.0, 2.75]],
], np.float32)
HAND_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)


def _random_losses(seed, shape=(4, 3, 6)):
  """Losses on a 1/8 grid, so many exact ties between consecutive steps."""
  rng = np.random.default_rng(seed)
  l = (np.round(rng.uniform(0.0, 1.0, shape) * 8) / 8).astype(np.float32)
  mask = (rng.uniform(size=shape[1:]) < 0.7).astype(np.float32)
  mask[0, 0] = 1.0  # at least one supervised token
  return l, mask


def _check(token_losses, mask, rtol=1e-6, atol=0.0, **kw):
  total, aux = _loss(jnp.asarray(token_losses), jnp.asarray(mask), **kw)
  ref_total, ref_per_step, ref_regressions = ref_recursion_loss(token_losses, mask, **kw)
  np.testing.assert_allclose(float(total), ref_total, rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.asarray(aux["loss_per_step"]), ref_per_step, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux["regressions"]), ref_regressions, rtol=1e-6)
  return float(total), aux


# ----------------------------------------------------------------------------------------
# recursion_loss values.
# ----------------------------------------------------------------------------------------

def test_reference_hand_check():
  """Pins the numpy reference itself on the hand-made example."""
  total, per_step, regressions = ref_recursion_loss(HAND_LOSSES, HAND_MASK, beta=2.0)
  # Supervised tokens: 7. Step 2 doubles 0.75 and 1.25; step 3 doubles 2.0, 0.5, 2.75.
  s1 = (2.0 + 1.5 + 0.5 + 1.0 + 0.25 + 4.0 + 2.5) / 7
  s2 = (1.0 + 1.5 + 2 * 0.75 + 2 * 1.25 + 0.25 + 3.0 + 2.0) / 7
  s3 = (1.0 + 2 * 2.0 + 0.5 + 0.5 + 2 * 0.5 + 3.0 + 2 * 2.75) / 7
  assert total == pytest.approx(s1 + s2 + s3, rel=1e-12)
  np.testing.assert_allclose(regressions, [0.0, 2 / 7, 3 / 7], rtol=1e-12)
  np.testing.assert_allclose(
      per_step, HAND_LOSSES.astype(np.float64)[:, HAND_MASK.astype(bool)].mean(-1),
      rtol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 2.0, 4.0])
def test_hard_form_matches_reference(beta):
  _check(HAND_LOSSES, HAND_MASK, beta=beta)
  for seed in range(3):
    _check(*_random_losses(seed), beta=beta)


def test_regressions_on_hand_example():
  """Ties and masked rises do not count; step 1 has no predecessor."""
  _, aux = _loss(jnp.asarray(HAND_LOSSES), jnp.asarray(HAND_MASK))
  np.testing.assert_allclose(np.asarray(aux["regressions"]), [0.0, 2 / 7, 3 / 7], rtol=1e-6)


def test_ties_are_not_rises():
  """Equal consecutive losses: weight 1 for any beta, so the total is deep supervision."""
  l = np.tile(np.array([[[0.5, 1.25, 2.0]]], np.float32), (3, 2, 1))
  mask = np.ones((2, 3), np.float32)
  total, aux = _check(l, mask, beta=4.0)
  assert total == pytest.approx(3 * (0.5 + 1.25 + 2.0) / 3, rel=1e-6)
  np.testing.assert_array_equal(np.asarray(aux["regressions"]), [0.0, 0.0, 0.0])


def test_beta_one_is_deep_supervision():
  """beta = 1: the sum over steps of the masked mean, whatever the rises."""
  for l, mask in [(HAND_LOSSES, HAND_MASK), _random_losses(7)]:
    total, aux = _check(l, mask, beta=1.0)
    l64 = l.astype(np.float64)
    deep = sum(l64[r][mask.astype(bool)].mean() for r in range(l.shape[0]))
    assert total == pytest.approx(deep, rel=1e-6)
    assert total == pytest.approx(float(np.sum(aux["loss_per_step"])), rel=1e-6)


def test_beta_increases_total_only_through_rises():
  """Sanity on direction: beta > 1 adds (beta - 1) * the mean of the risen losses."""
  t1, _ = _check(HAND_LOSSES, HAND_MASK, beta=1.0)
  t4, _ = _check(HAND_LOSSES, HAND_MASK, beta=4.0)
  risen = (0.75 + 1.25 + 2.0 + 0.5 + 2.75) / 7
  assert t4 - t1 == pytest.approx(3.0 * risen, rel=1e-6)


@pytest.mark.parametrize("form", ["hard", "soft"])
def test_step_weights(form):
  weights = (0.25, 0.5, 2.0)
  total, _ = _check(HAND_LOSSES, HAND_MASK, form=form, step_weights=weights, rtol=1e-5,
                    atol=1e-6)
  # Non-uniform lambdas must change the total (guards against them being ignored).
  unweighted, _ = _check(HAND_LOSSES, HAND_MASK, form=form, rtol=1e-5, atol=1e-6)
  assert total != pytest.approx(unweighted, rel=1e-3)
  l, mask = _random_losses(11)
  _check(l, mask, form=form, step_weights=(1.0, 0.0, 3.0, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["hard", "soft"])
def test_single_step(form):
  """R = 1: no predecessor, so no weights or penalty; the total is the masked mean."""
  l = HAND_LOSSES[:1]
  total, aux = _check(l, HAND_MASK, form=form, beta=4.0, step_weights=(3.0,))
  assert total == pytest.approx(3.0 * l[0][HAND_MASK.astype(bool)].astype(float).mean(),
                                rel=1e-6)
  np.testing.assert_array_equal(np.asarray(aux["regressions"]), [0.0])


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_soft_form_matches_reference(gamma):
  _check(HAND_LOSSES, HAND_MASK, form="soft", gamma=gamma, rtol=1e-5, atol=1e-6)
  for seed in range(3):
    _check(*_random_losses(seed), form="soft", gamma=gamma, rtol=1e-5, atol=1e-6)


def test_final_only():
  """Last step's masked mean only; beta and form are irrelevant."""
  for l, mask in [(HAND_LOSSES, HAND_MASK), _random_losses(3)]:
    total, aux = _check(l, mask, kind="final_only")
    assert total == pytest.approx(float(aux["loss_per_step"][-1]), rel=1e-6)
    assert total == pytest.approx(
        l[-1][mask.astype(bool)].astype(np.float64).mean(), rel=1e-6)
    g = np.asarray(_grad(jnp.asarray(l), jnp.asarray(mask), kind="final_only"))
    np.testing.assert_array_equal(g[:-1], 0.0)
    np.testing.assert_allclose(g[-1], mask / mask.sum(), rtol=1e-6)


@pytest.mark.parametrize("kind,form", [("monotonic", "hard"), ("monotonic", "soft"),
                                       ("final_only", "hard")])
def test_no_supervised_tokens_is_zero_not_nan(kind, form):
  mask = np.zeros_like(HAND_MASK)
  total, aux = _loss(jnp.asarray(HAND_LOSSES), jnp.asarray(mask), kind=kind, form=form)
  assert float(total) == 0.0
  np.testing.assert_array_equal(np.asarray(aux["loss_per_step"]), 0.0)
  np.testing.assert_array_equal(np.asarray(aux["regressions"]), 0.0)
  g = np.asarray(_grad(jnp.asarray(HAND_LOSSES), jnp.asarray(mask), kind=kind, form=form))
  np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------------------
# Gradients: no gradient through the comparison.
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta,weights", [(2.0, ()), (4.0, (0.5, 1.0, 3.0))])
def test_hard_gradient_treats_weights_as_constants(beta, weights):
  """d L / d l_i^(r) = lambda_r * w_i^(r) * m_i / sum(m), exactly (up to float32)."""
  for l, mask in [(HAND_LOSSES, HAND_MASK), _random_losses(5, (3, 3, 6))]:
    g = np.asarray(_grad(jnp.asarray(l), jnp.asarray(mask), beta=beta,
                         step_weights=weights))
    lam = weights or (1.0,) * l.shape[0]
    expected = np.zeros(l.shape, np.float64)
    n = mask.sum()
    for r in range(l.shape[0]):
      for b in range(l.shape[1]):
        for t in range(l.shape[2]):
          rose = r > 0 and l[r, b, t] > l[r - 1, b, t]
          expected[r, b, t] = lam[r] * (beta if rose else 1.0) * mask[b, t] / n
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("gamma,weights", [(1.0, ()), (0.5, (0.5, 1.0, 3.0))])
def test_soft_gradient_stops_at_previous_step(gamma, weights):
  """Step r's penalty differentiates only w.r.t. l^(r); l^(r-1) is a constant there.

  d L / d l_i^(r) = lambda_r * m_i / sum(m) * (1 + gamma * SiLU'(l_i^(r) - l_i^(r-1)))
  (no SiLU' term at r = 1), and no -gamma * SiLU' contribution from step r + 1.
  """
  for l, mask in [(HAND_LOSSES, HAND_MASK), _random_losses(9, (3, 3, 6))]:
    g = np.asarray(_grad(jnp.asarray(l), jnp.asarray(mask), form="soft", gamma=gamma,
                         step_weights=weights))
    lam = weights or (1.0,) * l.shape[0]
    l64 = l.astype(np.float64)
    n = mask.sum()
    expected = np.zeros(l.shape, np.float64)
    for r in range(l.shape[0]):
      for b in range(l.shape[1]):
        for t in range(l.shape[2]):
          d = 1.0 + (gamma * _silu_grad(l64[r, b, t] - l64[r - 1, b, t]) if r > 0 else 0.0)
          expected[r, b, t] = lam[r] * mask[b, t] / n * d
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------
# per_step_token_losses.
# ----------------------------------------------------------------------------------------

R, B, T, D, V = 3, 2, 6, 5, 7


def _head_setup():
  """Random linear head, hidden [R,B,T,d], and tokens with some targets = the argmax."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D, V)).astype(np.float32)
  bias = rng.normal(size=(V,)).astype(np.float32)
  hidden = rng.normal(size=(R, B, T, D)).astype(np.float32)
  logits = hidden.astype(np.float64) @ w + bias  # [R, B, T, V]
  tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
  # Make the last step right at every other position, so `correct` is mixed.
  tokens[:, 1::2] = logits[-1, :, 0::2][:, :tokens[:, 1::2].shape[1]].argmax(-1)
  # argmax must not hinge on float32 rounding.
  top2 = np.sort(logits, -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 1e-4
  return w, bias, hidden, tokens, logits


def _logits_fn(w, bias):
  return lambda h: h @ w + bias


@jax.jit
def _per_step(w, bias, hidden, tokens):
  return losses.per_step_token_losses(_logits_fn(w, bias), hidden, tokens)


@jax.jit
def _per_step_grad(w, bias, hidden, tokens, cot):
  f = lambda h: jnp.sum(losses.per_step_token_losses(_logits_fn(w, bias), h, tokens)[0] * cot)
  return jax.grad(f)(hidden)


@jax.jit
def _direct_grad(w, bias, hidden, tokens, cot):
  """The same quantity with all R x B x (T-1) x V logits materialised at once."""
  def f(h):
    logp = jax.nn.log_softmax(h[:, :, :-1] @ w + bias, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.broadcast_to(tokens[None, :, 1:, None],
                                                      (R, B, T - 1, 1)), -1)[..., 0]
    return jnp.sum(nll * cot)
  return jax.grad(f)(hidden)


def test_per_step_token_losses_values():
  w, bias, hidden, tokens, logits = _head_setup()
  loss, correct = _per_step(w, bias, hidden, tokens)
  assert loss.shape == (R, B, T - 1) and correct.shape == (R, B, T - 1)
  assert loss.dtype == jnp.float32 and correct.dtype == jnp.bool_
  ref_loss = np.zeros((R, B, T - 1))
  ref_correct = np.zeros((R, B, T - 1), bool)
  for r in range(R):
    for b in range(B):
      for t in range(T - 1):
        # Position t predicts token t + 1.
        ref_loss[r, b, t] = ref_token_cross_entropy(logits[r, b, t], tokens[b, t + 1])
        ref_correct[r, b, t] = logits[r, b, t].argmax() == tokens[b, t + 1]
  np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(correct), ref_correct)
  assert ref_correct.any() and not ref_correct.all()  # the check is not vacuous


def test_per_step_token_losses_gradient():
  """Gradient through checkpoint + scan equals the direct one and the analytic one."""
  w, bias, hidden, tokens, logits = _head_setup()
  cot = np.random.default_rng(1).normal(size=(R, B, T - 1)).astype(np.float32)
  g = np.asarray(_per_step_grad(w, bias, hidden, tokens, cot))
  g_direct = np.asarray(_direct_grad(w, bias, hidden, tokens, cot))
  np.testing.assert_allclose(g, g_direct, rtol=1e-5, atol=1e-6)
  # Analytic: d nll / d h = (softmax - onehot) @ w^T; the last position gets nothing.
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  expected = np.zeros((R, B, T, D))
  for r in range(R):
    for b in range(B):
      for t in range(T - 1):
        d = p[r, b, t].copy()
        d[tokens[b, t + 1]] -= 1.0
        expected[r, b, t] = cot[r, b, t] * (w.astype(np.float64) @ d)
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(g[:, :, -1], 0.0)


# ----------------------------------------------------------------------------------------
# exact_match.
# ----------------------------------------------------------------------------------------

def test_exact_match():
  mask = np.array([
      [0, 1, 1, 0],   # all supervised right, an unsupervised token wrong -> counts
      [0, 1, 1, 1],   # one supervised token wrong -> no
      [0, 0, 0, 0],   # nothing supervised -> never counts, even if all right
      [1, 1, 1, 1],   # all right -> counts
  ], bool)
  correct = np.array([
      [0, 1, 1, 0],
      [1, 1, 0, 1],
      [1, 1, 1, 1],
      [1, 1, 1, 1],
  ], bool)
  out = np.asarray(losses.exact_match(jnp.asarray(correct), jnp.asarray(mask)))
  np.testing.assert_array_equal(out, [True, False, False, True])
  # Leading step axis: correct [R, B, T] with a shared mask [B, T]; float masks work too.
  stacked = np.stack([correct, np.zeros_like(correct), np.ones_like(correct)])
  out = np.asarray(losses.exact_match(jnp.asarray(stacked), jnp.asarray(mask, jnp.float32)))
  np.testing.assert_array_equal(out, [[True, False, False, True],
                                      [False, False, False, False],
                                      [True, True, False, True]])


# ----------------------------------------------------------------------------------------
# check_loss_config.
# ----------------------------------------------------------------------------------------

def _loss_cfg(**overrides):
  """A copy of configs/base.py's c.loss with overrides."""
  cfg = ml_collections.ConfigDict(base_config.get_config().loss.to_dict())
  cfg.update(overrides)
  return cfg


def test_check_loss_config_accepts_valid():
  losses.check_loss_config(_loss_cfg(), num_steps=3)
  losses.check_loss_config(_loss_cfg(beta=1.0, form="soft"), num_steps=3)
  losses.check_loss_config(_loss_cfg(kind="final_only"), num_steps=3)
  losses.check_loss_config(_loss_cfg(step_weights=(1.0, 2.0, 3.0)), num_steps=3)


@pytest.mark.parametrize("overrides,field", [
    (dict(kind="monotone"), "kind"),
    (dict(form="smooth"), "form"),
    (dict(beta=0.5), "beta"),
    (dict(step_weights=(1.0, 1.0)), "step_weights"),
    (dict(step_weights=(1.0, 1.0, 1.0, 1.0)), "step_weights"),
])
def test_check_loss_config_rejects(overrides, field):
  with pytest.raises(ValueError, match=field):
    losses.check_loss_config(_loss_cfg(**overrides), num_steps=3)
