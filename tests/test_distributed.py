"""Data-parallel K-FAC: 8 devices give the 1-device updates under pmap, shard_map and sharded jit;
the statistics all-reduce is one packed collective; refreshes are split across devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kfax
from kfax import _distributed

DEVICES = 8
pytestmark = pytest.mark.skipif(jax.device_count() < DEVICES, reason='needs 8 (CPU) devices')


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, use_bias=False)(x))
    return nn.Dense(5)(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))


MODEL = Net()


def loss_fn(params, x, y):
  return kfax.softmax_cross_entropy(MODEL.apply({'params': params}, x), y)


def _data(steps=3, batch=16):
  keys = jax.random.split(jax.random.key(0), steps)
  xs = jnp.stack([jax.random.normal(k, (batch, 6, 6, 2)) for k in keys])
  ys = jnp.stack([jax.random.randint(k, (batch,), 0, 5) for k in keys])
  params = MODEL.init(jax.random.key(1), xs[0])['params']
  return params, xs, ys


def _tx(axis_name=None, **kwargs):
  return optax.chain(kfax.kfac(damping=1e-2, inverse_every=2, axis_name=axis_name, **kwargs),
                     optax.sgd(0.1, momentum=0.9))


def _train(step_fn, params, xs, ys, state):
  """Three steps: statistics, none, statistics (each refresh on counts 0 and 2)."""
  for i in range(xs.shape[0]):
    params, state = step_fn(params, state, xs[i], ys[i], i % 2 == 0)
  return params


def _train_sharded(step, mesh, tx):
  """`_train` on the batches sharded over the mesh's 'data' axis."""
  params, xs, ys = _data()
  batch = NamedSharding(mesh, P(None, 'data'))
  return _train(step, params, jax.device_put(xs, batch), jax.device_put(ys, batch),
                tx.init(params))


def _step(tx, grad_and_stats, params, state, x, y, with_stats):
  grads, stats = grad_and_stats(params, x, y, with_stats)
  updates, state = tx.update(grads, state, params, stats=stats)
  return optax.apply_updates(params, updates), state


def _local(params, x, y, with_stats):
  if with_stats:
    _, grads, stats = kfax.value_grad_and_stats(loss_fn)(params, x, y)
    return grads, stats
  return jax.grad(loss_fn)(params, x, y), None


@functools.lru_cache(maxsize=None)
def _reference():
  params, xs, ys = _data()
  tx = _tx()
  step = jax.jit(functools.partial(_step, tx, _local), static_argnums=4)
  return _train(step, params, xs, ys, tx.init(params))


def _assert_same(params):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                                                       atol=2e-5), params, _reference())


def test_pmap_matches_one_device():
  params, xs, ys = _data()
  tx = _tx('batch', comm_dtype='float32')

  def grad_and_stats(params, x, y, with_stats):
    grads, stats = _local(params, x, y, with_stats)
    return jax.lax.pmean(grads, 'batch'), stats

  step = jax.pmap(functools.partial(_step, tx, grad_and_stats), axis_name='batch',
                  static_broadcasted_argnums=4)
  replicate = lambda t: jax.tree.map(lambda v: jnp.broadcast_to(v, (DEVICES, *v.shape)), t)
  shard = lambda v: v.reshape(v.shape[0], DEVICES, -1, *v.shape[2:])
  out = _train(step, replicate(params), shard(xs), shard(ys), replicate(tx.init(params)))
  _assert_same(jax.tree.map(lambda v: v[0], out))


@pytest.mark.parametrize('check_vma', [True, False])
@pytest.mark.parametrize('axis_type', [AxisType.Explicit, AxisType.Auto])
def test_shard_map_matches_one_device(check_vma, axis_type):
  mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(axis_type,))
  tx = _tx('data')

  def grad_and_stats(params, x, y, with_stats):
    grads, stats = _local(params, x, y, with_stats)
    if check_vma:  # gradients w.r.t. replicated params arrive summed over devices
      return jax.tree.map(lambda g: g / jax.lax.psum(1, 'data'), grads), stats
    return jax.lax.pmean(grads, 'data'), stats

  def step(params, state, x, y, with_stats):
    body = lambda p, s, x, y: _step(tx, grad_and_stats, p, s, x, y, with_stats)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
                         out_specs=(P(), P()), check_vma=check_vma)(params, state, x, y)

  _assert_same(_train_sharded(jax.jit(step, static_argnums=4), mesh, tx))


def test_sharded_jit_matches_one_device():
  mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(AxisType.Auto,))
  tx = _tx()
  step = jax.jit(functools.partial(_step, tx, _local), static_argnums=4)
  _assert_same(_train_sharded(step, mesh, tx))


def test_statistics_are_averaged_in_one_packed_all_reduce():
  params, xs, ys = _data()
  _, _, stats = kfax.value_grad_and_stats(loss_fn)(params, xs[0], ys[0])
  for dtype, itemsize in (('float32', 4), ('bfloat16', 2)):
    fn = lambda s: _distributed.mean_statistics(s, 'batch', jnp.dtype(dtype))
    jaxpr = jax.make_jaxpr(jax.pmap(fn, axis_name='batch'))(
        jax.tree.map(lambda v: jnp.broadcast_to(v, (DEVICES, *v.shape)), stats))
    (psum,) = _equations(jaxpr.jaxpr, 'psum')  # pmean is one psum of one buffer
    sizes = [m.shape[0] for m in jax.tree.leaves(stats)]
    packed = sum(n * (n + 1) // 2 for n in sizes)
    (operand,) = psum.invars
    assert operand.aval.shape == (packed,) and operand.aval.dtype.itemsize == itemsize
    # Bytes per statistics step: Σ n(n+1)/2 · itemsize, about half of the Σ n² · 4 unpacked.
    assert packed * itemsize < 0.6 * sum(n * n for n in sizes) * 4
  roundtrip = _distributed.unpack_symmetric(
      _distributed.pack_symmetric(jax.tree.leaves(stats), jnp.float32), jax.tree.leaves(stats))
  jax.tree.map(np.testing.assert_array_equal, roundtrip, jax.tree.leaves(stats))


def _resnet50_factor_sizes():
  """(d_in, d_out) of every conv and the classifier of an ImageNet ResNet-50 (no conv biases)."""
  sizes = [(7 * 7 * 3, 64)]
  cin = 64
  for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
    for b in range(blocks):
      sizes += [(cin, width), (9 * width, width), (width, 4 * width)]
      if b == 0:
        sizes.append((cin, 4 * width))
      cin = 4 * width
  return sizes + [(2048 + 1, 1000)]


def test_greedy_assignment_balances_resnet50_within_1_25():
  sizes = _resnet50_factor_sizes()
  assert len(sizes) == 54
  costs = {}
  for i, (d_in, d_out) in enumerate(sizes):
    costs[('a', i)], costs[('g', i)] = float(d_in) ** 3, float(d_out) ** 3
  for devices in (2, 4, 8):
    owned = _distributed.assign(costs, devices)
    assert sorted(k for keys in owned for k in keys) == sorted(costs)  # each job exactly once
    ideal = max(sum(costs.values()) / devices, max(costs.values()))
    assert max(sum(costs[k] for k in keys) for keys in owned) <= 1.25 * ideal


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns') or hasattr(item, 'jaxpr'):
        yield getattr(item, 'jaxpr', item)


def _equations(jaxpr, name: str) -> list:
  """Every equation of primitive `name` in a jaxpr and the jaxprs nested in it."""
  found = [e for e in jaxpr.eqns if e.primitive.name == name]
  for eqn in jaxpr.eqns:
    for sub in _subjaxprs(eqn):
      found += _equations(sub, name)
  return found


def _eigh_matrices(jaxpr) -> int:
  """Matrices decomposed by the eigh equations of a jaxpr (a batched eigh counts its batch)."""
  return sum(int(np.prod(e.invars[0].aval.shape[:-2])) for e in _equations(jaxpr, 'eigh'))


def test_each_device_decomposes_only_its_share():
  params, xs, ys = _data()
  _, _, stats = kfax.value_grad_and_stats(loss_fn)(params, xs[0], ys[0])
  work = {(side, k): v[f'{side}_factor'] for k, v in stats.items() for side in 'ag'}
  fn = lambda w: _distributed.split_work(kfax._inverse.eigendecompose, w, 'batch')
  jaxpr = jax.make_jaxpr(jax.pmap(fn, axis_name='batch'))(
      jax.tree.map(lambda v: jnp.broadcast_to(v, (DEVICES, *v.shape)), work)).jaxpr
  (switch,) = _equations(jaxpr, 'cond')
  per_device = [_eigh_matrices(b.jaxpr) for b in switch.params['branches']]
  owned = _distributed.assign({k: float(m.shape[0]) ** 3 for k, m in work.items()}, DEVICES)
  assert per_device == [len(keys) for keys in owned]
  assert sum(per_device) == len(work)  # every factor decomposed once in all, not once per device
  # Refresh traffic: one all-reduce of every eigendecomposition, Σ (n² + n) float32 numbers.
  psums = _equations(jaxpr, 'psum')
  sent = sum(int(np.prod(v.aval.shape)) for e in psums for v in e.invars)
  assert sent == sum(m.shape[0] ** 2 + m.shape[0] for m in work.values())


def test_accumulated_micro_batches_equal_one_batch():
  """4 micro-batches of 4 give the loss, gradients and statistics of one batch of 16 (the
  empirical Fisher is deterministic, so up to float32 rounding: 1e-5, on entries up to ~25)."""
  params, xs, ys = _data()
  grad_fn = kfax.value_grad_and_stats(loss_fn)
  whole = grad_fn(params, xs[0], ys[0])
  accumulated = jax.jit(kfax.accumulate(grad_fn, 4))(params, xs[0], ys[0])
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  jax.tree.map(close, accumulated, whole)
  plain = jax.jit(kfax.accumulate(jax.value_and_grad(loss_fn), 4))(params, xs[0], ys[0])
  jax.tree.map(close, plain, whole[:2])
  with pytest.raises(ValueError, match=r'leading axis divisible by acc_iters=3, got shape \(16,'):
    kfax.accumulate(grad_fn, 3)(params, xs[0], ys[0])
  with pytest.raises(ValueError, match=r'`acc_iters` must be an integer >= 1, got 0'):
    kfax.accumulate(grad_fn, 0)


def test_accumulation_communicates_once_per_update():
  params, xs, ys = _data()
  tx = _tx('batch')

  def step(acc_iters, params, state, x, y):
    grad_fn = kfax.accumulate(kfax.value_grad_and_stats(loss_fn), acc_iters)
    _, grads, stats = grad_fn(params, x, y)
    updates, state = tx.update(jax.lax.pmean(grads, 'batch'), state, params, stats=stats)
    return updates

  shard = lambda v: v.reshape(DEVICES, -1, *v.shape[1:])
  replicate = lambda t: jax.tree.map(lambda v: jnp.broadcast_to(v, (DEVICES, *v.shape)), t)
  collectives = []
  for acc_iters in (1, 2):
    jaxpr = jax.make_jaxpr(jax.pmap(functools.partial(step, acc_iters), axis_name='batch'))(
        replicate(params), replicate(tx.init(params)), shard(xs[0]), shard(ys[0]))
    collectives.append(len(_equations(jaxpr.jaxpr, 'psum')))
  assert collectives[0] == collectives[1]
