"""kfax.kfac as an optax transformation: the optax checklist, state safety, errors, checkpoints."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from utils import assert_close, compile_counter


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _problem(seed=0):
  """params, loss, batch and the loss's layer table (Conv_0 and Dense_0, both Kronecker)."""
  model = CNN()
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (8, 6, 6, 1))
  y = jax.random.randint(ky, (8,), 0, 3)
  params = model.init(jax.random.key(1), x)['params']
  loss_fn = lambda p, x, y: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  table = kfax.value_grad_and_stats(loss_fn).layers(params, x, y)
  return params, loss_fn, x, y, table


def _stats(loss_fn, params, x, y):
  """(loss, grads, stats) with the MC Fisher (the default) from a fixed key."""
  return kfax.value_grad_and_stats(loss_fn)(params, x, y, rng=jax.random.key(0))


def _steps(tx, loss_fn):
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='mc')

  def with_stats(params, state, x, y, key):
    _, grads, stats = grad_fn(params, x, y, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats)
    return optax.apply_updates(params, updates), state

  def without_stats(params, state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params, stats=None)
    return optax.apply_updates(params, updates), state

  return with_stats, without_stats


@pytest.mark.parametrize('mode', ['eigen', 'factored'])
def test_jit_compiles_once_across_refresh_and_no_stats_steps(mode):
  params, loss_fn, x, y, table = _problem()
  tx = optax.chain(kfax.kfac(table, damping=1e-2, inverse_every=3, damping_mode=mode),
                   optax.sgd(0.05))
  with_stats, without_stats = _steps(tx, loss_fn)
  with_stats, stats_traces = compile_counter(with_stats)
  without_stats, plain_traces = compile_counter(without_stats)
  state = tx.init(params)
  losses = []
  for step in range(8):
    if step % 2 == 0:
      params, state = with_stats(params, state, x, y, jax.random.key(step))
    else:
      params, state = without_stats(params, state, x, y)
    losses.append(float(loss_fn(params, x, y)))
  assert stats_traces[0] == 1 and plain_traces[0] == 1
  assert int(state[0].count) == 8
  assert losses[-1] < losses[0]


def test_stats_none_keeps_factors_and_refresh_follows_the_period():
  params, loss_fn, x, y, table = _problem()
  tx = kfax.kfac(table, inverse_every=4, ema_decay=0.5, damping_mode='eigen')
  state = tx.init(params)
  _, grads, stats = _stats(loss_fn, params, x, y)
  update = jax.jit(lambda g, s, st: tx.update(g, s, stats=st))
  _, s1 = update(grads, state, stats)  # count 0: first stats, refresh
  conv = stats['Conv_0']['a_factor']
  assert_close(s1.factors['Conv_0']['a_factor'], conv)  # first stats replace
  _, s2 = update(grads, s1, None)  # count 1: nothing changes
  jax.tree.map(np.testing.assert_array_equal, s2.factors, s1.factors)
  _, s3 = update(grads, s2, jax.tree.map(lambda s: 3.0 * s, stats))  # count 2: EMA, no refresh
  assert_close(s3.factors['Conv_0']['a_factor'], 0.5 * conv + 0.5 * 3.0 * conv, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, s3.decompositions, s1.decompositions)
  _, s4 = update(grads, s3, None)  # count 3
  _, s5 = update(grads, s4, None)  # count 4: refresh
  assert_close(s5.decompositions['Conv_0']['a_eigvals'],
               2.0 * s1.decompositions['Conv_0']['a_eigvals'], rtol=1e-4, atol=1e-6)
  assert [int(s.count) for s in (s1, s2, s3, s4, s5)] == [1, 2, 3, 4, 5]
  assert {k: int(c) for k, c in s5.stats_count.items()} == {'Conv_0': 2, 'Dense_0': 2}


def test_gradients_pass_through_until_statistics_arrive():
  params, loss_fn, x, y, table = _problem()
  tx = kfax.kfac(table)
  grads = jax.grad(loss_fn)(params, x, y)
  updates, _ = tx.update(grads, tx.init(params), stats=None)
  jax.tree.map(np.testing.assert_array_equal, updates, grads)


def test_nan_statistics_leave_the_factors_unchanged():
  params, loss_fn, x, y, table = _problem()
  tx = kfax.kfac(table)
  _, grads, stats = _stats(loss_fn, params, x, y)
  _, state = tx.update(grads, tx.init(params), stats=stats)
  bad = jax.tree.map(lambda s: s.at[0, 0].set(jnp.nan), stats)
  updates, new_state = jax.jit(lambda g, s, st: tx.update(g, s, stats=st))(grads, state, bad)
  jax.tree.map(np.testing.assert_array_equal, new_state.factors, state.factors)
  jax.tree.map(np.testing.assert_array_equal, new_state.stats_count, state.stats_count)
  assert int(new_state.skipped_stats) == 1 and int(new_state.failed_refreshes) == 0
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_a_failing_refresh_keeps_the_last_good_inverse():
  params, loss_fn, x, y, table = _problem()
  tx = kfax.kfac(table, damping_mode='factored', inverse_every=1, ema_decay=0.0)
  _, grads, stats = _stats(loss_fn, params, x, y)
  _, state = tx.update(grads, tx.init(params), stats=stats)
  # Finite but negative definite: the Cholesky factorization fails and yields NaN.
  bad = {k: {'a_factor': -10.0 * jnp.eye(v['a_factor'].shape[0]), 'g_factor': v['g_factor']}
         for k, v in stats.items()}
  updates, new_state = jax.jit(lambda g, s, st: tx.update(g, s, stats=st))(grads, state, bad)
  assert int(new_state.failed_refreshes) == 1 and int(new_state.skipped_stats) == 0
  jax.tree.map(np.testing.assert_array_equal, new_state.decompositions, state.decompositions)
  assert set(state.decompositions['Conv_0']) == {'a_inverse', 'g_inverse'}
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_inject_hyperparams_and_state_stable_under_lax_cond():
  params, loss_fn, x, y, table = _problem()
  tx = optax.inject_hyperparams(kfax.kfac)(table, damping=1e-3, ema_decay=0.9, inverse_every=2,
                                          damping_mode='eigen', norm_constraint=None)
  state = tx.init(params)
  _, grads, stats = _stats(loss_fn, params, x, y)

  @jax.jit
  def step(state, pred):
    return jax.lax.cond(pred, lambda s: tx.update(grads, s, stats=stats),
                        lambda s: (grads, s), state)

  _, s1 = step(state, True)
  assert jax.tree.structure(s1) == jax.tree.structure(state)
  jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(), s1, state)
  updates_small, _ = tx.update(grads, s1, stats=None)
  s1.hyperparams['damping'] = jnp.asarray(10.0)
  updates_big, _ = tx.update(grads, s1, stats=None)
  small = optax.tree.norm(updates_small)
  assert float(optax.tree.norm(updates_big)) < 0.1 * float(small)


def test_norm_constraint_bounds_the_fisher_norm():
  params, loss_fn, x, y, table = _problem()
  _, grads, stats = _stats(loss_fn, params, x, y)
  free = kfax.kfac(table, damping=1e-3, norm_constraint=None)
  v, _ = free.update(grads, free.init(params), stats=stats)
  fisher_norm = float(optax.tree.vdot(v, grads))
  bounded = kfax.kfac(table, damping=1e-3, norm_constraint=fisher_norm / 4)
  w, _ = bounded.update(grads, bounded.init(params), stats=stats)
  jax.tree.map(lambda a, b: assert_close(a, 0.5 * b, rtol=1e-5, atol=1e-8), w, v)


def test_checkpoint_round_trip_gives_bit_identical_updates(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  params, loss_fn, x, y, table = _problem()
  tx = optax.chain(kfax.kfac(table, inverse_every=2), optax.sgd(0.1, momentum=0.9))
  with_stats, _ = _steps(tx, loss_fn)
  with_stats = jax.jit(with_stats)
  state = tx.init(params)
  for step in range(3):
    params, state = with_stats(params, state, x, y, jax.random.key(step))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'opt', state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / 'opt', jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert isinstance(restored[0], kfax.KfacState)
  a = with_stats(params, state, x, y, jax.random.key(9))
  b = with_stats(params, restored, x, y, jax.random.key(9))
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('kwargs, match', [
    (dict(damping=-1e-3), r'`damping` must be > 0; pass a positive float or an optax schedule,'
                          r' got -0.001'),
    (dict(damping=0.0), r'`damping` must be > 0'),
    (dict(ema_decay=1.5), r'`ema_decay` must be in \[0, 1\].*got 1.5'),
    (dict(inverse_every=0), r'`inverse_every` must be an integer >= 1.*got 0'),
    (dict(inverse_every=2.5), r'`inverse_every` must be an integer >= 1.*got 2.5'),
    (dict(norm_constraint=-1.0), r'`norm_constraint` must be > 0, or None'),
    (dict(damping_mode='tikhonov'), r"`damping_mode` must be one of \('eigen', 'factored'\),"
                                    r" got 'tikhonov'"),
    (dict(refresh='lazy'), r"`refresh` must be one of \('together', 'staggered'\), got 'lazy'"),
    (dict(refresh='staggered', gather='gradients', axis_name='i'),
     r"refresh='staggered' is not available with gather='gradients'"),
])
def test_bad_configuration_raises_at_construction(kwargs, match):
  table = _problem()[-1]
  with pytest.raises(ValueError, match=match):
    kfax.kfac(table, **kwargs)


def test_bad_comm_dtype_raises():
  table = _problem()[-1]
  with pytest.raises(ValueError, match=r'`comm_dtype` must be float32, bfloat16 or float16, got int8'):
    kfax.kfac(table, axis_name='batch', comm_dtype='int8')


def test_the_layer_table_is_required():
  params = _problem()[0]
  with pytest.raises(TypeError, match=r'the first argument is the layer table of the loss, '
                     r'`kfax.value_grad_and_stats\(loss_fn\).layers\(params, \*batch\)`; got dict'):
    kfax.kfac(params)


def test_mismatched_trees_and_statistics_raise():
  params, loss_fn, x, y, table = _problem()
  _, grads, stats = _stats(loss_fn, params, x, y)
  tx = kfax.kfac(table)
  state = tx.init(params)
  wrong = dict(stats, Conv_0={'a_factor': jnp.eye(5), 'g_factor': jnp.eye(4)})
  with pytest.raises(ValueError, match=r"`stats` do not match the layer table \(missing \[\],"
                     r" unknown \[\], other shapes \['Conv_0'\]\)"):
    tx.update(grads, state, stats=wrong)
  with pytest.raises(ValueError,
                     match=r"\(missing \[\], unknown \['Other_0'\], other shapes \[\]\)"):
    tx.update(grads, state, stats=dict(stats, Other_0=stats['Conv_0']))
  with pytest.raises(ValueError,
                     match=r"\(missing \['Dense_0'\], unknown \[\], other shapes \[\]\)"):
    tx.update(grads, state, stats={'Conv_0': stats['Conv_0']})
  with pytest.raises(TypeError, match=r'`stats` must be the dict of statistics'):
    tx.update(grads, state, stats=[stats])
  other = dict(grads, Dense_0={'kernel': jnp.zeros((7, 3)), 'bias': jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"the updates do not match the layer table the optimizer"
                     r" was built with \(missing \[\], unknown \[\],"
                     r" other shapes \['Dense_0/kernel'\]\)"):
    tx.update(other, state, stats=None)
  with pytest.raises(ValueError, match=r"the updates do not match.*missing \['Dense_0/bias',"
                     r" 'Dense_0/kernel'\]"):
    tx.update({'Conv_0': grads['Conv_0']}, state, stats=None)
  with pytest.raises(ValueError,
                     match=r"the params do not match the layer table.*unknown \['extra'\]"):
    tx.init(dict(params, extra=jnp.zeros(2)))
  with pytest.raises(TypeError, match=r'update needs the statistics of this step.*explicit'
                     r' `stats=None` on steps that computed none\.$'):
    tx.update(grads, state, params)
  with pytest.raises(TypeError, match=r'\(got `stat=`: a misspelling\?\)'):
    tx.update(grads, state, params, stat=stats)


def test_docstring_examples_run():
  import doctest

  from kfax import _transform
  result = doctest.testmod(_transform, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


def test_inject_hyperparams_with_the_defaults():
  params, loss_fn, x, y, table = _problem()
  tx = optax.chain(optax.inject_hyperparams(kfax.kfac)(table), optax.sgd(0.1))
  _, grads, stats = _stats(loss_fn, params, x, y)
  updates, state = jax.jit(lambda s: tx.update(grads, s, params, stats=stats))(tx.init(params))
  assert float(state[0].hyperparams['norm_constraint']) == pytest.approx(1e-3)
  # The default norm constraint holds: vᵀg <= c for the preconditioned layers (all, here).
  assert float(optax.tree.vdot(updates, grads)) / 0.1 <= 1e-3 * (1 + 1e-4)


def test_state_can_be_donated():
  """Every state leaf is its own buffer: a jit that donates the state runs (no shared zeros)."""
  params, loss_fn, x, y, table = _problem()
  tx = optax.chain(kfax.kfac(table), optax.sgd(0.1))
  _, grads, stats = _stats(loss_fn, params, x, y)
  step = jax.jit(lambda s: tx.update(grads, s, params, stats=stats)[1], donate_argnums=0)
  state = step(step(tx.init(params)))
  assert int(state[0].count) == 2


class Deep(nn.Module):
  @nn.compact
  def __call__(self, x):
    for width in (16, 12, 8, 6):
      x = nn.tanh(nn.Dense(width)(x))
    return nn.Dense(3)(x)


def _inverse_reference(a, g, damping):
  """(A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ in float64 numpy, π from the mean traces."""
  a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
  root = np.sqrt(damping)
  return (np.linalg.inv(a + pi * root * np.eye(len(a))),
          np.linalg.inv(g + root / pi * np.eye(len(g))))


def test_staggered_refresh_spreads_each_period_over_its_updates():
  """`refresh="staggered"`, 5 Kronecker layers over 3 phases: all refresh on the first
  statistics; after that each entry refreshes exactly once per period, on the updates of its
  own phase, from the factors it has then (against float64 numpy inverses), and the phases
  split the decomposition cost about evenly. The default refreshes every entry together."""
  from kfax import _transform

  model, period, damping = Deep(), 3, 1e-2
  x = jax.random.normal(jax.random.key(0), (32, 10))
  y = jnp.arange(32) % 3
  params = model.init(jax.random.key(1), x)['params']
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn)
  table = grad_fn.layers(params)
  phases = _transform.refresh_phases(table.of('kronecker'), period)
  assert sorted(k for keys in phases for k in keys) == sorted(table.of('kronecker'))
  assert all(phases)  # 5 layers over 3 phases: none empty
  phase_of = {k: p for p, keys in enumerate(phases) for k in keys}
  dims = {k: e.dims for k, e in table.of('kronecker').items()}
  cost = [sum(n ** 3 for k in keys for n in dims[k]) for keys in phases]
  assert max(cost) < 0.5 * sum(cost)  # the largest layer alone is 0.41 of the total

  for refresh in ('staggered', 'together'):
    tx = kfax.kfac(table, damping=damping, ema_decay=0.5, inverse_every=period,
                   refresh=refresh)

    @jax.jit
    def step(p, s, key):
      _, grads, stats = grad_fn(p, rng=key)
      return tx.update(grads, s, p, stats=stats)[1]

    state, refreshed = tx.init(params), {k: [] for k in table.of('kronecker')}
    before = None
    for count in range(2 * period + 1):
      after = step(params, state, jax.random.key(count))
      for key, d in after.decompositions.items():
        changed = before is None or not np.array_equal(d['a_inverse'],
                                                       before.decompositions[key]['a_inverse'])
        if changed:
          refreshed[key].append(count)
          a_inv, g_inv = _inverse_reference(after.factors[key]['a_factor'],
                                            after.factors[key]['g_factor'], damping)
          np.testing.assert_allclose(d['a_inverse'], a_inv, rtol=2e-3, atol=1e-4)
          np.testing.assert_allclose(d['g_inverse'], g_inv, rtol=2e-3, atol=1e-4)
      state, before = after, after
    for key, counts in refreshed.items():
      if refresh == 'together':
        assert counts == [0, 3, 6], (key, counts)
      else:
        p = phase_of[key]
        assert counts == sorted({0} | {c for c in range(1, 2 * period + 1) if c % period == p})


def test_staggered_refresh_needs_a_static_period():
  params, loss_fn, x, y, table = _problem()
  tx = optax.inject_hyperparams(kfax.kfac)(table, inverse_every=2, refresh='staggered')
  state = tx.init(params)
  _, grads, stats = _stats(loss_fn, params, x, y)
  with pytest.raises(TypeError, match=r"static_args=\('inverse_every',\)"):
    tx.update(grads, state, params, stats=stats)
  tx = optax.inject_hyperparams(kfax.kfac, static_args=('inverse_every',))(
      table, inverse_every=2, refresh='staggered')
  updates, _ = jax.jit(lambda s: tx.update(grads, s, params, stats=stats))(tx.init(params))
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
