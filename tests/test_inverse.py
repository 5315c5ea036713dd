"""Both damping modes against dense float64 numpy algebra on random factors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax import _curvature, _inverse
from kfax._table import Entry
from utils import assert_close, kron, relative_error


def _spd(rng, d, scale=1.0):
  m = rng.normal(size=(d, 2 * d))
  return scale * m @ m.T / (2 * d)


def _pi(a, g):
  """The trace-norm π = sqrt((tr A / dim A) / (tr G / dim G))."""
  return np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))


def _eigen_reference(a, g, x, damping):
  """(A ⊗ G + λI)⁻¹ vec(X), densely."""
  dense = kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
  return np.linalg.solve(dense, x.ravel()).reshape(x.shape)


def _factored_reference(a, g, x, damping):
  """(A + π√λ I)⁻¹ X (G + √λ/π I)⁻¹ with the trace-norm π, densely."""
  pi = _pi(a, g)
  a_damped = a + pi * np.sqrt(damping) * np.eye(a.shape[0])
  g_damped = g + np.sqrt(damping) / pi * np.eye(g.shape[0])
  # As a Kronecker system: ((A+..) ⊗ (G+..)) vec(Y) = vec(X).
  return np.linalg.solve(kron(a_damped, g_damped), x.ravel()).reshape(x.shape)


def _kronecker_entry(blocks, dims, diag):
  return Entry(key='k', kind='dense', curvature='kronecker', leaves=(), layout=(), stack=(),
               blocks=blocks, dims=dims, diag=diag, roles=(), note='')


# blocks (leading axes of the curvature: groups, nn.scan stacks) and diagonal sides (Embed's
# token side, a side > max_factor_dim).
CASES = {
    'dense': ((), (False, False)),
    'blocks': ((2, 3), (False, False)),
    'diagonal_a': ((2,), (True, False)),
    'diagonal_g': ((), (False, True)),
}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _refresh_and_precondition(entry, eigen, factors, x, damping):
  """One compile per entry and mode (eagerly, every operation would compile on its own)."""
  decomps, ok = _curvature.refresh({'k': entry}, {'k': factors}, damping, eigen)
  out = _curvature.precondition_kronecker(entry, x, decomps['k'], damping, eigen)
  return decomps['k'], ok['k'], out


@pytest.mark.parametrize('damping', [1e-4, 1e-2, 1.0])
def test_curvature_formulas_against_dense_float64(damping):
  """`_curvature.refresh` then `precondition_kronecker`, per block, in float32 against the dense
  float64 formulas of both modes; `pi_correction` against the trace formula."""
  rng = np.random.default_rng(0)
  d_a, d_g = 5, 4
  for case, (blocks, diag) in CASES.items():
    count = int(np.prod(blocks))
    a = [_spd(rng, d_a, 3.0) for _ in range(count)]
    g = [_spd(rng, d_g, 0.01) for _ in range(count)]
    a = [np.diag(rng.uniform(0.1, 3.0, d_a)) for _ in range(count)] if diag[0] else a
    g = [np.diag(rng.uniform(1e-3, 0.03, d_g)) for _ in range(count)] if diag[1] else g
    x = rng.normal(size=(count, d_a, d_g))
    # The references see exactly the float32 inputs kfax sees.
    a, g, x = (np.asarray(np.float32(m), np.float64) for m in (a, g, x))
    entry = _kronecker_entry(blocks, (d_a, d_g), diag)
    def stored(ms, diagonal):  # blocks + (n, n), or blocks + (n,) for a diagonal side
      ms = np.stack([np.diag(m) for m in ms]) if diagonal else ms
      return jnp.asarray(ms.reshape(blocks + ms.shape[1:]), jnp.float32)

    factors = {'a_factor': stored(a, diag[0]), 'g_factor': stored(g, diag[1])}
    pi = _curvature.pi_correction(entry, factors)
    assert pi.shape == blocks
    assert_close(np.ravel(pi), [_pi(a[i], g[i]) for i in range(count)], rtol=1e-5)
    for eigen, reference in ((True, _eigen_reference), (False, _factored_reference)):
      decomps, ok, out = _refresh_and_precondition(
          entry, eigen, factors, jnp.asarray(x.reshape(blocks + (d_a, d_g)), jnp.float32),
          jnp.float32(damping))
      assert bool(ok)
      assert {n: v.shape for n, v in decomps.items()} == _curvature.decomposition_shapes(
          entry, eigen)
      assert out.dtype == jnp.float32 and out.shape == blocks + (d_a, d_g)
      out = np.asarray(out, np.float64).reshape(count, d_a, d_g)
      for i in range(count):
        ref = reference(a[i], g[i], x[i], damping)
        assert relative_error(out[i], ref) < 1e-4, (case, eigen, i)


def test_unitwise_and_diagonal_damping_match_a_factored_kronecker_block():
  """Eigen mode damps a unit-wise or diagonal block by λ; factored mode by λ' = 2√(λ m) + λ,
  m its mean eigenvalue, which is exactly what π-factored damping adds to a 1x1 Kronecker block
  A = a, G = g with a g = m."""
  rng = np.random.default_rng(4)
  damping = 1e-2
  fisher = np.stack([_spd(rng, 2, 0.5) for _ in range(3)])  # 3 channels of (scale, bias)
  x = rng.normal(size=(3, 2))
  fisher, x = np.asarray(np.float32(fisher), np.float64), np.asarray(np.float32(x), np.float64)
  unitwise = jax.jit(_curvature.precondition_unitwise, static_argnums=3)
  for eigen in (True, False):
    out = unitwise(jnp.asarray(x, jnp.float32), jnp.asarray(fisher, jnp.float32), damping, eigen)
    for c in range(3):
      m = np.trace(fisher[c]) / 2
      shift = damping if eigen else 2 * np.sqrt(damping * m) + damping
      ref = np.linalg.solve(fisher[c] + shift * np.eye(2), x[c])
      assert relative_error(out[c], ref) < 1e-5, (eigen, c)
  one = unitwise(jnp.asarray(x[:, :1], jnp.float32), jnp.asarray(fisher[:, :1, :1], jnp.float32),
                 damping, False)
  shift = 2 * np.sqrt(damping * fisher[:, 0, 0]) + damping
  assert relative_error(one[:, 0], x[:, 0] / (fisher[:, 0, 0] + shift)) < 1e-5

  a, g = 3.0, 0.02
  entry = _kronecker_entry((), (1, 1), (False, False))
  factors = {'a_factor': jnp.full((1, 1), a), 'g_factor': jnp.full((1, 1), g)}
  _, _, kron_out = _refresh_and_precondition(entry, False, factors, jnp.ones((1, 1)), damping)
  diag_out = _curvature.precondition_diagonal(jnp.ones(()), jnp.asarray(a * g), damping, False)
  assert_close(kron_out[0, 0], diag_out, rtol=1e-5)
  assert_close(diag_out, 1 / (a * g + 2 * np.sqrt(damping * a * g) + damping), rtol=1e-5)
  assert_close(_curvature.precondition_diagonal(jnp.ones(()), jnp.asarray(a * g), damping, True),
               1 / (a * g + damping), rtol=1e-6)


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


def _dense(features, d_in):
  """nn.Dense(features) on d_in inputs: its params and layer table (key '', the top level)."""
  model = nn.Dense(features)
  x = jnp.ones((1, d_in))
  params = model.init(jax.random.key(0), x)['params']
  loss = lambda p: kfax.squared_error(model.apply({'params': p}, x), jnp.zeros((1, features)))
  return params, kfax.value_grad_and_stats(loss).layers(params)


@pytest.mark.parametrize('mode', ['eigen', 'factored'])
def test_kfac_update_equals_dense_formula(mode):
  """Public path: stats in, preconditioned kernel+bias out, in float32 against float64."""
  rng = np.random.default_rng(2)
  params, table = _dense(4, 5)
  a, g = _spd(rng, 6, 2.0), _spd(rng, 4, 0.05)
  stats = {'': {'a_factor': jnp.asarray(a, jnp.float32), 'g_factor': jnp.asarray(g, jnp.float32)}}
  grads = {'kernel': jnp.asarray(rng.normal(size=(5, 4)), jnp.float32),
           'bias': jnp.asarray(rng.normal(size=4), jnp.float32)}
  damping = 1e-2
  tx = kfax.kfac(table, damping=damping, ema_decay=0.9, damping_mode=mode, norm_constraint=None)
  updates, state = tx.update(grads, tx.init(params), stats=stats)
  x = np.concatenate([np.asarray(grads['kernel']), np.asarray(grads['bias'])[None]])
  reference = (_eigen_reference if mode == 'eigen' else _factored_reference)(a, g, x, damping)
  got = np.concatenate([np.asarray(updates['kernel']), np.asarray(updates['bias'])[None]])
  assert relative_error(got, reference) < 1e-4
  # The first statistics replace the identity whatever ema_decay is.
  assert_close(state.factors['']['a_factor'], a, rtol=1e-6)


def test_eigen_damping_follows_a_schedule_every_step():
  rng = np.random.default_rng(3)
  params, table = _dense(2, 3)
  a, g = _spd(rng, 4), _spd(rng, 2)
  stats = {'': {'a_factor': jnp.asarray(a, jnp.float32), 'g_factor': jnp.asarray(g, jnp.float32)}}
  grads = jax.tree.map(jnp.ones_like, params)
  schedule = optax.piecewise_constant_schedule(1e-3, {1: 100.0})  # λ: 1e-3, then 0.1
  tx = kfax.kfac(table, damping=schedule, inverse_every=100, damping_mode='eigen',
                 norm_constraint=None)
  state = tx.init(params)
  x = np.ones((4, 2))
  for damping in (1e-3, 0.1):  # step 2 has no refresh but uses the new λ
    updates, state = tx.update(grads, state, stats=stats if damping == 1e-3 else None)
    got = np.concatenate([np.asarray(updates['kernel']), np.asarray(updates['bias'])[None]])
    assert relative_error(got, _eigen_reference(a, g, x, damping)) < 1e-4
