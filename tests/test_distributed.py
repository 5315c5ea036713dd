"""Data-parallel K-FAC: 8 devices give the 1-device updates under pmap, shard_map and sharded jit;
the statistics all-reduce is one packed collective; refreshes are split across devices."""

import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import kfax
from kfax import _distributed, _sharded
from kfax._table import Entry

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


# The empirical Fisher is deterministic: devices and micro-batches see the 1-device statistics.
GRAD_FN = kfax.value_grad_and_stats(loss_fn, fisher='empirical')


def _data(steps=3, batch=16):
  keys = jax.random.split(jax.random.key(0), steps)
  xs = jnp.stack([jax.random.normal(k, (batch, 6, 6, 2)) for k in keys])
  ys = jnp.stack([jax.random.randint(k, (batch,), 0, 5) for k in keys])
  params = MODEL.init(jax.random.key(1), xs[0])['params']
  return params, xs, ys


@functools.lru_cache(maxsize=None)
def _table():
  params, xs, ys = _data()
  return GRAD_FN.layers(params, xs[0], ys[0])


def _tx(axis_name=None, **kwargs):
  return optax.chain(
      kfax.kfac(_table(), damping=1e-2, inverse_every=2, axis_name=axis_name, **kwargs),
      optax.sgd(0.1, momentum=0.9))


def _replicate(tree):
  return jax.tree.map(lambda v: jnp.broadcast_to(v, (DEVICES, *v.shape)), tree)


def _train(step_fn, params, xs, ys, state):
  """Three steps: statistics, none, statistics (each refresh on counts 0 and 2)."""
  for i in range(xs.shape[0]):
    params, state = step_fn(params, state, xs[i], ys[i], i % 2 == 0)
  return params


def _train_sharded(step, mesh, tx, state=None):
  """`_train` on the batches sharded over the mesh's 'data' axis."""
  params, xs, ys = _data()
  batch = NamedSharding(mesh, P(None, 'data'))
  return _train(step, params, jax.device_put(xs, batch), jax.device_put(ys, batch),
                tx.init(params) if state is None else state)


def _step(tx, grad_and_stats, params, state, x, y, with_stats):
  grads, stats = grad_and_stats(params, x, y, with_stats)
  updates, state = tx.update(grads, state, params, stats=stats)
  return optax.apply_updates(params, updates), state


def _local(params, x, y, with_stats):
  if with_stats:
    _, grads, stats = GRAD_FN(params, x, y)
    return grads, stats
  return jax.grad(loss_fn)(params, x, y), None


@functools.lru_cache(maxsize=None)
def _reference(damping_mode='factored', refresh='together'):
  params, xs, ys = _data()
  tx = _tx(damping_mode=damping_mode, refresh=refresh)
  step = jax.jit(functools.partial(_step, tx, _local), static_argnums=4)
  return _train(step, params, xs, ys, tx.init(params))


def _assert_same(params, damping_mode='factored', refresh='together'):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                                                       atol=2e-5),
               params, _reference(damping_mode, refresh))


@pytest.mark.parametrize('gather,damping_mode,refresh', [
    ('decompositions', 'factored', 'together'), ('gradients', 'factored', 'together'),
    ('gradients', 'eigen', 'together'), ('decompositions', 'eigen', 'staggered')])
def test_pmap_matches_one_device(gather, damping_mode, refresh):
  """Also `refresh="staggered"`: each phase's share of the layers split over the devices."""
  tx = _tx('batch', comm_dtype='float32', gather=gather, damping_mode=damping_mode,
           refresh=refresh)
  _assert_same(_train_pmap(tx, _local), damping_mode, refresh)


def _train_pmap(tx, local):
  """`_train` under `pmap` over the 8 devices, `local` each device's gradients and statistics;
  device 0's final params."""
  params, xs, ys = _data()

  def grad_and_stats(params, x, y, with_stats):
    grads, stats = local(params, x, y, with_stats)
    return jax.lax.pmean(grads, 'batch'), stats

  step = jax.pmap(functools.partial(_step, tx, grad_and_stats), axis_name='batch',
                  static_broadcasted_argnums=4)
  shard = lambda v: v.reshape(v.shape[0], DEVICES, -1, *v.shape[2:])
  # gather='gradients' keeps a different share of the state on each device: init per device.
  state = jax.pmap(tx.init, axis_name='batch')(_replicate(params))
  out = _train(step, _replicate(params), shard(xs), shard(ys), state)
  return jax.tree.map(lambda v: v[0], out)


@pytest.mark.parametrize('check_vma,axis_type,gather', [  # each value of each setting, pairwise
    (True, AxisType.Explicit, 'decompositions'), (False, AxisType.Auto, 'decompositions'),
    (True, AxisType.Auto, 'gradients'), (False, AxisType.Explicit, 'gradients')])
def test_shard_map_matches_one_device(check_vma, axis_type, gather):
  _assert_same(_train_shard_map(_tx('data', gather=gather), _local, check_vma, axis_type))


def _train_shard_map(tx, local, check_vma, axis_type):
  """`_train` under `shard_map` over a 'data' axis of the 8 devices, `local` each device's
  gradients and statistics, the optimizer state laid out by `kfax.partition_specs`."""
  mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(axis_type,))
  params = _data()[0]
  shapes = jax.eval_shape(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=P(),
                                        check_vma=False), params)
  specs = kfax.partition_specs(shapes, 'data')
  state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=specs))(params)

  def grad_and_stats(params, x, y, with_stats):
    grads, stats = local(params, x, y, with_stats)
    if check_vma:  # gradients w.r.t. replicated params arrive summed over devices
      return jax.tree.map(lambda g: g / jax.lax.psum(1, 'data'), grads), stats
    return jax.lax.pmean(grads, 'data'), stats

  def step(params, state, x, y, with_stats):
    body = lambda p, s, x, y: _step(tx, grad_and_stats, p, s, x, y, with_stats)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), specs, P('data'), P('data')),
                         out_specs=(P(), specs), check_vma=check_vma)(params, state, x, y)

  return _train_sharded(jax.jit(step, static_argnums=4), mesh, tx, state)


@pytest.mark.parametrize('split', [False, True])
def test_sharded_jit_matches_one_device(split):
  """Plain jit on a batch-sharded input; with `mesh`, each refresh is split across its axis."""
  mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(AxisType.Auto,))
  tx = _tx('data', mesh=mesh) if split else _tx()
  step = jax.jit(functools.partial(_step, tx, _local), static_argnums=4)
  _assert_same(_train_sharded(step, mesh, tx))
  if split:  # each device inverts only its own share of the factors
    params, xs, ys = _data()
    jaxpr = jax.make_jaxpr(step, static_argnums=4)(params, tx.init(params), xs[0], ys[0], True)
    (switch,) = [e for e in _equations(jaxpr.jaxpr, 'cond') if len(e.params['branches']) > 2]
    per_device = [len(_equations(b.jaxpr, 'cholesky')) for b in switch.params['branches']]
    assert sum(per_device) == 2 * len(params) and max(per_device) < sum(per_device) / 2


def test_statistics_are_averaged_in_one_packed_all_reduce():
  params, xs, ys = _data()
  _, grads, stats = GRAD_FN(params, xs[0], ys[0])
  for dtype, itemsize in (('float32', 4), ('bfloat16', 2)):
    fn = lambda s: _distributed.mean_statistics(s, 'batch', jnp.dtype(dtype))
    jaxpr = jax.make_jaxpr(jax.pmap(fn, axis_name='batch'))(_replicate(stats))
    (psum,) = _equations(jaxpr.jaxpr, 'psum')  # pmean is one psum of one buffer
    sizes = [m.shape[0] for m in jax.tree.leaves(stats)]
    packed = sum(n * (n + 1) // 2 for n in sizes)
    (operand,) = psum.invars
    assert operand.aval.shape == (packed,) and operand.aval.dtype.itemsize == itemsize
    # Bytes per statistics step: Σ n(n+1)/2 · itemsize, about half of the Σ n² · 4 unpacked.
    assert packed * itemsize < 0.6 * sum(n * n for n in sizes) * 4
  # kfac's own update: outside the refresh, exactly one all-reduce, of that packed buffer.
  for dtype, itemsize in (('float32', 4), ('bfloat16', 2)):
    tx = kfax.kfac(_table(), axis_name='batch', comm_dtype=dtype)
    step = lambda g, s, st: tx.update(g, s, stats=st)[0]
    jaxpr = jax.make_jaxpr(jax.pmap(step, axis_name='batch'))(
        _replicate(grads), _replicate(tx.init(params)), _replicate(stats)).jaxpr
    (psum,) = _equations(jaxpr, 'psum', skip='cond')
    (operand,) = psum.invars
    assert operand.aval.shape == (packed,) and operand.aval.dtype.itemsize == itemsize
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


def _equations(jaxpr, name: str, skip: str | None = None) -> list:
  """Every equation of primitive `name` in a jaxpr and the jaxprs nested in it, except those
  nested in equations of primitive `skip`."""
  found = [e for e in jaxpr.eqns if e.primitive.name == name]
  for eqn in jaxpr.eqns:
    if eqn.primitive.name != skip:
      for sub in _subjaxprs(eqn):
        found += _equations(sub, name, skip)
  return found


def _eigh_matrices(jaxpr) -> int:
  """Matrices decomposed by the eigh equations of a jaxpr (a batched eigh counts its batch)."""
  return sum(int(np.prod(e.invars[0].aval.shape[:-2])) for e in _equations(jaxpr, 'eigh'))


def test_each_device_decomposes_only_its_share():
  params, xs, ys = _data()
  _, _, stats = GRAD_FN(params, xs[0], ys[0])
  work = {(side, k): v[f'{side}_factor'] for k, v in stats.items() for side in 'ag'}
  fn = lambda w: _distributed.split_work(kfax._inverse.eigendecompose, w, 'batch')
  jaxpr = jax.make_jaxpr(jax.pmap(fn, axis_name='batch'))(_replicate(work)).jaxpr
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
  grad_fn = GRAD_FN
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
    grad_fn = kfax.accumulate(GRAD_FN, acc_iters)
    _, grads, stats = grad_fn(params, x, y)
    updates, state = tx.update(jax.lax.pmean(grads, 'batch'), state, params, stats=stats)
    return updates

  shard = lambda v: v.reshape(DEVICES, -1, *v.shape[1:])
  collectives = []
  for acc_iters in (1, 2):
    jaxpr = jax.make_jaxpr(jax.pmap(functools.partial(step, acc_iters), axis_name='batch'))(
        _replicate(params), _replicate(tx.init(params)), shard(xs[0]), shard(ys[0]))
    collectives.append(len(_equations(jaxpr.jaxpr, 'psum')))
  assert collectives[0] == collectives[1]


def _kronecker_entry(key, d_in, d_out):
  """A table entry of one dense Kronecker layer with factors of sizes (d_in, d_out)."""
  return Entry(key=key, kind='conv', curvature='kronecker', leaves=(f'{key}/kernel',),
               layout=(None,), stack=(), blocks=(), dims=(d_in, d_out), diag=(False, False),
               roles=(('apply', (False, True)),), note='')


def test_gradients_gather_shards_the_state_and_all_reduces_gradients_once():
  """gather='gradients' (MEM-OPT): each device keeps its own layers' curvature, gets their
  statistics by one reduce-scatter, decomposes them alone, and one all-reduce of exactly the
  layers' gradient size gathers the preconditioned gradients."""
  params, xs, ys = _data()
  _, grads, stats = GRAD_FN(params, xs[0], ys[0])
  table = _table()
  entries = table.of('kronecker')
  assert len(entries) == len(table.entries) == 4  # 2 convs, 2 dense: all Kronecker
  tx = kfax.kfac(table, axis_name='batch', gather='gradients', damping_mode='eigen')
  state = jax.pmap(tx.init, axis_name='batch')(_replicate(params))
  step = lambda g, s, st: tx.update(g, s, stats=st)[0]
  jaxpr = jax.make_jaxpr(jax.pmap(step, axis_name='batch'))(
      _replicate(grads), state, _replicate(stats)).jaxpr
  dims = {k: e.dims for k, e in entries.items()}
  layout = _sharded.layout(entries, DEVICES, eigen=True)
  assert state.shard.shape == (DEVICES, layout.shard_size)
  assert state.factors == {} and state.decompositions == {}  # nothing replicated
  (scatter,) = _equations(jaxpr, 'reduce_scatter')
  packed = sum(n * (n + 1) // 2 for d in dims.values() for n in d)
  assert scatter.invars[0].aval.shape == (DEVICES * layout.stats_size,)
  assert packed <= DEVICES * layout.stats_size
  # Besides the per-layer non-finite statistics flags and the failed-refresh scalar: one
  # all-reduce of exactly the Kronecker layers' gradient size.
  reduced = sorted(int(np.prod(v.aval.shape)) for e in _equations(jaxpr, 'psum') for v in e.invars)
  assert reduced == [1, len(entries), sum(a * g for a, g in dims.values())]
  assert sum(a * g for a, g in dims.values()) == sum(v.size for v in jax.tree.leaves(params))
  (switch,) = [e for e in _equations(jaxpr, 'cond') if _equations(e.params['branches'][0].jaxpr,
                                                                     'eigh')]
  per_device = [_eigh_matrices(b.jaxpr) for b in switch.params['branches']]
  assert per_device == [2 * len(keys) for keys in layout.owned]
  # On ResNet-50 a device's share is at most 1.1 / devices of the replicated state, and the
  # reduce-scatter's padded buffer at most 1.5x the packed factors (a reduce-scatter moves half
  # of what an all-reduce of the same buffer moves: at most 0.75 of the replicated mode's).
  entries = {str(i): _kronecker_entry(str(i), *d) for i, d in enumerate(_resnet50_factor_sizes())}
  replicated = sum(2 * n * n + n for e in entries.values() for n in e.dims)  # factor, eigh
  packed = sum(n * (n + 1) // 2 for e in entries.values() for n in e.dims)
  for devices in (2, 4, 8):
    layout = _sharded.layout(entries, devices, eigen=True)
    assert sorted(k for keys in layout.owned for k in keys) == sorted(entries)
    assert layout.shard_size <= 1.1 * replicated / devices
    assert devices * layout.stats_size <= 1.5 * packed


def test_distributed_configuration_errors():
  params = _data()[0]
  table = _table()
  mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(AxisType.Auto,))
  with pytest.raises(ValueError, match=r"gather='gradients' needs `axis_name`"):
    kfax.kfac(table, gather='gradients')
  with pytest.raises(ValueError, match=r'`mesh` needs `axis_name`'):
    kfax.kfac(table, mesh=mesh)
  with pytest.raises(ValueError, match=r"`axis_name` 'batch' is not an axis of `mesh`"):
    kfax.kfac(table, axis_name='batch', mesh=mesh)
  with pytest.raises(ValueError, match=r'`gather` must be one of'):
    kfax.kfac(table, axis_name='data', gather='layers')
  with pytest.raises(ValueError, match=r'wrap the step in jax.shard_map'):
    kfax.kfac(table, axis_name='data', mesh=mesh, gather='gradients')
  with pytest.raises(ValueError, match=r"the axis 'data' is not bound.*inside jax.pmap"):
    kfax.kfac(table, axis_name='data', gather='gradients').init(params)


# ---------------------------------------------------------------------------------------------
# NNX: the twin of `Net`, named so that its `nnx.Param` state has the linen params' paths. With
# the linen weights copied in, it must reach the 1-device linen reference on 8 devices.


class NnxNet(nnx.Module):
  def __init__(self, rngs, partitioned=False):
    self.Conv_0 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.Conv_1 = nnx.Conv(4, 6, (3, 3), strides=2, use_bias=False, rngs=rngs)
    init = lambda *names: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
    # linen's `nn.Dense(5)(nn.Dense(16)(x))` builds (and names) the outer layer first
    self.Dense_0 = nnx.Linear(16, 5, rngs=rngs,
                              **({'kernel_init': init('data', None)} if partitioned else {}))
    self.Dense_1 = nnx.Linear(54, 16, rngs=rngs,
                              **({'kernel_init': init(None, 'data')} if partitioned else {}))

  def __call__(self, x):
    x = nnx.relu(self.Conv_0(x))
    x = nnx.relu(self.Conv_1(x))
    return self.Dense_0(nnx.relu(self.Dense_1(x.reshape(x.shape[0], -1))))


def nnx_loss_fn(model, x, y):
  return kfax.softmax_cross_entropy(model(x), y)


NNX_GRAD_FN = kfax.value_grad_and_stats(nnx_loss_fn, fisher='empirical')


def _nnx_model(params, **kwargs):
  """An `NnxNet` holding the linen `params`."""
  model = NnxNet(nnx.Rngs(0), **kwargs)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def _nnx_local(graphdef):
  """`_local` for the NNX twin: params as the same pure dict the linen model has."""

  def local(params, x, y, with_stats):
    model = nnx.merge(graphdef, params)
    if with_stats:
      _, grads, stats = NNX_GRAD_FN(model, x, y)
    else:
      grads, stats = nnx.grad(nnx_loss_fn)(model, x, y), None
    return nnx.to_pure_dict(grads), stats

  return local


def test_nnx_table_is_the_linen_table():
  params, xs, ys = _data()
  assert NNX_GRAD_FN.layers(_nnx_model(params), xs[0], ys[0]) == _table()


def test_nnx_pmap_matches_one_device():
  params = _data()[0]
  _assert_same(_train_pmap(_tx('batch'), _nnx_local(nnx.graphdef(_nnx_model(params)))))


def test_nnx_shard_map_matches_one_device():
  """With check_vma: each layer's accumulators vary over the devices like its input."""
  local = _nnx_local(nnx.graphdef(_nnx_model(_data()[0])))
  _assert_same(_train_shard_map(_tx('data'), local, True, AxisType.Explicit))


def test_nnx_partitioned_model_under_nnx_optimizer_matches_one_device():
  """Kernels annotated with `nnx.with_partitioning` and sharded over the devices, trained by
  `nnx.Optimizer` under `nnx.jit` on a batch-sharded input: the 1-device linen updates."""
  mesh = jax.make_mesh((DEVICES,), ('data',), axis_types=(AxisType.Auto,))
  params, xs, ys = _data()
  with jax.set_mesh(mesh):
    model = _nnx_model(params, partitioned=True)
    state = nnx.state(model, nnx.Param)  # the linen weights, placed as annotated
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda v, s: jax.device_put(v, NamedSharding(mesh, s)), nnx.to_pure_dict(state), specs))
    nnx.update(model, state)
  kernel = model.Dense_1.kernel
  assert nnx.get_partition_spec(nnx.state(model.Dense_1))['kernel'] == P(None, 'data')
  assert kernel[...].sharding.spec == P(None, 'data')
  @nnx.jit(static_argnums=3)
  def step(model, optimizer, batch, with_stats):
    x, y = batch
    if with_stats:
      _, grads, stats = NNX_GRAD_FN(model, x, y)
    else:
      grads, stats = nnx.grad(nnx_loss_fn)(model, x, y), None
    optimizer.update(model, grads, stats=stats)

  with jax.set_mesh(mesh):  # the optimizer's state is created as annotated, too
    optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
    batch = NamedSharding(mesh, P('data'))
    for i in range(xs.shape[0]):
      step(model, optimizer, jax.device_put((xs[i], ys[i]), batch), i % 2 == 0)
  _assert_same(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _quadratic_step(tx, params, state, x, y, axis_name=None):
  _, grads, stats = GRAD_FN(params, x, y)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
  updates, state = tx.update(grads, state, params, stats=stats,
                             gauss_newton=GRAD_FN.gauss_newton(params, x, y),
                             loss=lambda p: loss_fn(p, x, y))
  return optax.apply_updates(params, updates), state


def test_quadratic_model_under_pmap_matches_one_device():
  """`kfax.quadratic_model(..., axis_name=)`: 3 updates on 8 devices (Gram matrix and loss
  reduction averaged over them) equal 1 device's, damping adapted on updates 0 and 2 included."""
  params, xs, ys = _data()

  def make(axis):
    return kfax.quadratic_model(
        kfax.kfac(_table(), damping=1e-2, inverse_every=2, axis_name=axis, norm_constraint=None),
        initial_damping=0.1, adapt_every=2, axis_name=axis)

  one = make(None)
  step = jax.jit(functools.partial(_quadratic_step, one))
  p1, s1 = params, one.init(params)
  for x, y in zip(xs, ys):
    p1, s1 = step(p1, s1, x, y)
  many = make('batch')
  step = jax.pmap(functools.partial(_quadratic_step, many, axis_name='batch'), axis_name='batch')
  shard = lambda v: v.reshape(DEVICES, -1, *v.shape[1:])
  pn, sn = _replicate(params), jax.pmap(many.init, axis_name='batch')(_replicate(params))
  for x, y in zip(xs, ys):
    pn, sn = step(pn, sn, shard(x), shard(y))
  assert float(s1.damping) != 0.1  # the rule acted
  np.testing.assert_allclose(np.asarray(sn.damping[0]), np.asarray(s1.damping), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b),
                                                       rtol=2e-4, atol=2e-5), pn, p1)
