"""Both damping modes against dense float64 numpy algebra on random factors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax import _inverse
from utils import assert_close, kron, relative_error


def _spd(rng, d, scale=1.0):
  m = rng.normal(size=(d, 2 * d))
  return scale * m @ m.T / (2 * d)


def _eigen_reference(a, g, x, damping):
  """(A ⊗ G + λI)⁻¹ vec(X), densely."""
  dense = kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
  return np.linalg.solve(dense, x.ravel()).reshape(x.shape)


def _factored_reference(a, g, x, damping):
  """(A + π√λ I)⁻¹ X (G + √λ/π I)⁻¹ with the trace-norm π, densely."""
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  a_damped = a + pi * np.sqrt(damping) * np.eye(a.shape[0])
  g_damped = g + np.sqrt(damping) / pi * np.eye(g.shape[0])
  # As a Kronecker system: ((A+..) ⊗ (G+..)) vec(Y) = vec(X).
  return np.linalg.solve(kron(a_damped, g_damped), x.ravel()).reshape(x.shape)


@pytest.mark.parametrize('damping', [1e-4, 1e-2, 1.0])
def test_private_formulas_in_float64(x64, damping):
  rng = np.random.default_rng(0)
  a, g = _spd(rng, 5, 3.0), _spd(rng, 4, 0.01)
  x = rng.normal(size=(5, 4))
  eig = _inverse.eigendecompose({'a': jnp.asarray(a), 'g': jnp.asarray(g)})
  out = _inverse.precondition_eigen(jnp.asarray(x), eig['a'][1], eig['a'][0], eig['g'][1],
                                    eig['g'][0], damping)
  assert_close(out, _eigen_reference(a, g, x, damping), rtol=1e-9, atol=1e-12)
  a_damped, g_damped = _inverse.factored_damping(jnp.asarray(a), jnp.asarray(g), damping)
  inv = _inverse.invert({'a': a_damped, 'g': g_damped})
  out = _inverse.precondition_factored(jnp.asarray(x), inv['a'][0], inv['g'][0])
  assert_close(out, _factored_reference(a, g, x, damping), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('one_by_one', [True, False])
def test_equal_size_factors_are_decomposed_together_and_correctly(x64, monkeypatch, one_by_one):
  monkeypatch.setattr(_inverse, '_one_call_per_matrix', lambda: one_by_one)
  rng = np.random.default_rng(1)
  mats = {k: _spd(rng, 3) for k in 'abc'} | {'d': _spd(rng, 4)}
  eig = _inverse.eigendecompose({k: jnp.asarray(m) for k, m in mats.items()})
  for k, m in mats.items():
    vals, vecs = eig[k]
    assert_close(vecs @ jnp.diag(vals) @ vecs.T, m, rtol=1e-9, atol=1e-12)
  inv = _inverse.invert({k: jnp.asarray(m) for k, m in mats.items()})
  for k, m in mats.items():
    assert_close(inv[k][0] @ m, np.eye(m.shape[0]), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize('mode', ['eigen', 'factored'])
def test_kfac_update_equals_dense_formula(mode):
  """Public path: stats in, preconditioned kernel+bias out, in float32 against float64."""
  rng = np.random.default_rng(2)
  model = nn.Dense(4)
  params = model.init(jax.random.key(0), jnp.ones((1, 5)))['params']
  a, g = _spd(rng, 6, 2.0), _spd(rng, 4, 0.05)
  stats = {'': {'a_factor': jnp.asarray(a, jnp.float32), 'g_factor': jnp.asarray(g, jnp.float32)}}
  grads = {'kernel': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
           'bias': jnp.asarray(rng.normal(size=4), jnp.float32)}
  damping = 1e-2
  tx = kfax.kfac(damping=damping, ema_decay=0.9, damping_mode=mode, norm_constraint=None)
  updates, state = tx.update(grads, tx.init(params), stats=stats)
  x = np.concatenate([np.asarray(grads['kernel']), np.asarray(grads['bias'])[None]])
  reference = (_eigen_reference if mode == 'eigen' else _factored_reference)(a, g, x, damping)
  got = np.concatenate([np.asarray(updates['kernel']), np.asarray(updates['bias'])[None]])
  assert relative_error(got, reference) < 1e-4
  # The first statistics replace the identity whatever ema_decay is.
  assert_close(state.a_factor[''], a, rtol=1e-6)


def test_eigen_damping_follows_a_schedule_every_step():
  rng = np.random.default_rng(3)
  model = nn.Dense(2)
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
  a, g = _spd(rng, 4), _spd(rng, 2)
  stats = {'': {'a_factor': jnp.asarray(a, jnp.float32), 'g_factor': jnp.asarray(g, jnp.float32)}}
  grads = jax.tree.map(jnp.ones_like, params)
  schedule = optax.piecewise_constant_schedule(1e-3, {1: 100.0})  # λ: 1e-3, then 0.1
  tx = kfax.kfac(damping=schedule, inverse_every=100, damping_mode='eigen', norm_constraint=None)
  state = tx.init(params)
  x = np.ones((4, 2))
  for damping in (1e-3, 0.1):  # step 2 has no refresh but uses the new λ
    updates, state = tx.update(grads, state, stats=stats if damping == 1e-3 else None)
    got = np.concatenate([np.asarray(updates['kernel']), np.asarray(updates['bias'])[None]])
    assert relative_error(got, _eigen_reference(a, g, x, damping)) < 1e-4
