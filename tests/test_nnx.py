"""Flax NNX models: the same table, statistics and updates as their linen twins, and the contract.

1. Twins: every NNX layer kind and its linen counterpart with equal (float64) weights give equal
   losses, gradients, tables, statistics and `kfax.kfac` updates.
2. Every parameter of a mixed NNX model gets curvature (no diagonal fallback).
3. NNX transforms: `nnx.vmap`-created stacks applied with `nnx.scan`, `nnx.remat`, and an
   `nnx.vmap` ensemble give the statistics of their unrolled twins.
4. The contract: `nnx.jit` and `nnx.Optimizer`, plain `jax.jit` with split / merge, `has_aux`,
   BatchNorm running statistics and RNG state as `nnx.value_and_grad` leaves them, a clear error
   for a state instead of a model, and a learning test against plain SGD.
"""

import itertools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax

TOL = 1e-9  # float64 statistics, relative to the largest entry
UPDATE_TOL = 1e-5  # kfac factors and decompositions are float32 whatever the parameters' dtype


# ---------------------------------------------------------------------------------------------
# Helpers.


# Most graphs here run once: compile time is the cost, so LLVM's optimisations are off.
_FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _jit(fn, **kwargs):
  return jax.jit(fn, compiler_options=_FAST, **kwargs)


def _normal(seed, shape, dtype=jnp.float64):
  """Seeded standard normal values (numpy: no compile per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _build(factory, seed=0, scale=0.5):
  """`factory()`'s model from a shape-only init (no compile per initializer): parameters seeded
  normal * `scale`, so that biases and norm scales are not their trivial initial values; batch
  statistics ones; RNG keys `jax.random.key(seed)`, counts zero. Float parameters and statistics
  are float64 under x64, whatever the layers' `param_dtype` (nnx.BatchNorm's statistics are
  float32 regardless)."""
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)

  def fill(var):
    shape = var.get_value().shape
    if isinstance(var, nnx.Param):
      value = jnp.asarray(scale * rng.standard_normal(shape))
    elif isinstance(var, nnx.BatchStat):
      value = jnp.asarray(np.ones(shape))
    elif isinstance(var, nnx.RngKey):
      value = jax.random.key(seed)
    else:
      value = jnp.zeros(shape, var.get_value().dtype)
    return var.replace(value)

  state = jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def _flat(tree):
  """{'a/b/c': array} of a pytree of arrays (an nnx.State, a linen params dict)."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  out = {}
  for path, leaf in leaves:
    name = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                    for k in path)
    out[name] = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
  return out


def _unflat(flat):
  out = {}
  for name, value in flat.items():
    node = out
    *parents, last = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _assert_rel(actual, expected, tol=TOL, what='', scale=None):
  """`actual` equals `expected` within `tol` of `scale` (by default the largest entry)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = np.abs(expected).max() if scale is None else scale
  assert scale > 0, f'{what}: degenerate reference'
  err = np.abs(actual - expected).max()
  assert err <= tol * scale, f'{what}: max error {err:.3g} vs scale {scale:.3g}'


def _assert_trees(actual, expected, tol=TOL, rename=lambda k: k, what=''):
  """Two trees of arrays equal leaf by leaf (`actual`'s paths renamed), each within `tol` of its
  largest entry, or of a thousandth of the tree's for a leaf of rounding noise (the gradient of
  attention's key bias, which the softmax makes zero)."""
  a = {rename(k): v for k, v in _flat(actual).items()}
  e = _flat(expected)
  assert set(a) == set(e), (what, sorted(a), sorted(e))
  floor = 1e-3 * max(np.abs(np.asarray(v, np.float64)).max() for v in e.values())
  assert floor > 0, f'{what}: degenerate reference'
  for k in e:
    scale = max(np.abs(np.asarray(e[k], np.float64)).max(), floor)
    _assert_rel(a[k], e[k], tol, f'{what} {k}', scale)


def _cosine(u, g):
  u, g = np.asarray(u, np.float64).ravel(), np.asarray(g, np.float64).ravel()
  return float(u @ g / (np.linalg.norm(u) * np.linalg.norm(g)))


def _kfac_update(table, grads, params, stats, **options):
  """One `kfax.kfac` update (factors from `stats`, refreshed at once, no norm constraint)."""
  options = {'inverse_every': 1, 'damping': 1e-3, 'norm_constraint': None, **options}
  tx = kfax.kfac(table, **options)
  updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
  return updates


# ---------------------------------------------------------------------------------------------
# 1. Twins: an NNX layer and its linen counterpart with equal weights.


class Net(nnx.Module):
  """An NNX layer `self.layer` applied by `apply(layer, x)`."""

  def __init__(self, layer, apply):
    self.layer = layer
    self.apply = apply

  def __call__(self, x):
    return self.apply(self.layer, x)


class LinenNet(nn.Module):
  """The linen twin: the layer gets linen's automatic name (`Dense_0`, ...)."""

  make: callable
  apply_fn: callable

  @nn.compact
  def __call__(self, x):
    return self.apply_fn(self.make(), x)


def _call(layer, x):
  return layer(x)


def _embed_tied(layer, tokens):
  return layer.attend(jnp.tanh(layer(tokens)))


def _norm_head(layer, x):
  weights = jnp.arange(1.0, x.shape[-1] + 1).reshape((1,) * (x.ndim - 1) + (-1,))
  return jnp.tanh(layer(x)) * weights  # norms' outputs are centred: no trivial gradients


def _attention(query, key, value, mask=None, **unused):
  """Softmax attention in the inputs' dtype, for both twins (`nnx.dot_product_attention`'s fast
  path, `jax.nn.dot_product_attention`, takes its softmax in float32 even under x64)."""
  del unused
  assert mask is None
  logits = jnp.einsum('...qhd,...khd->...hqk', query, key) / np.sqrt(query.shape[-1])
  return jnp.einsum('...hqk,...khd->...qhd', jax.nn.softmax(logits, axis=-1), value)


F64 = {'param_dtype': jnp.float64}  # also Embed's compute dtype
R = lambda: {'rngs': nnx.Rngs(0), **F64}

# name: (nnx layer, linen layer, apply, input shape or 'tokens')
TWINS = {
    'linear': (lambda: nnx.Linear(3, 4, **R()), lambda: nn.Dense(4), _call, (5, 3)),
    'linear_general_two_axes': (
        lambda: nnx.LinearGeneral((3, 2), (2, 2), axis=(-2, -1), **R()),
        lambda: nn.DenseGeneral((2, 2), axis=(-2, -1)), _call, (5, 4, 3, 2)),
    'linear_general_batch_axis': (
        lambda: nnx.LinearGeneral(3, 4, axis=-1, batch_axis={0: 2}, **R()),
        lambda: nn.DenseGeneral(4, axis=-1, batch_dims=(0,)), _call, (2, 5, 3)),
    'einsum': (
        lambda: nnx.Einsum('btd,dhk->bthk', (3, 2, 2), (2, 2), **R()),
        lambda: nn.Einsum((3, 2, 2), 'btd,dhk->bthk'), _call, (5, 4, 3)),
    'conv': (lambda: nnx.Conv(3, 4, (3, 3), **R()),
             lambda: nn.Conv(4, (3, 3)), _call, (2, 5, 5, 3)),
    'conv_grouped': (
        lambda: nnx.Conv(4, 6, (3,), feature_group_count=2, padding='VALID', **R()),
        lambda: nn.Conv(6, (3,), feature_group_count=2, padding='VALID'), _call, (3, 7, 4)),
    'conv_circular': (
        lambda: nnx.Conv(2, 3, (3, 3), strides=2, padding='CIRCULAR', **R()),
        lambda: nn.Conv(3, (3, 3), strides=2, padding='CIRCULAR'), _call, (2, 6, 6, 2)),
    'conv_transpose': (
        lambda: nnx.ConvTranspose(2, 3, (3,), strides=2, **R()),
        lambda: nn.ConvTranspose(3, (3,), strides=2), _call, (3, 4, 2)),
    'attention': (
        lambda: nnx.MultiHeadAttention(2, 4, qkv_features=4, decode=False,
                                       attention_fn=_attention, **R()),
        lambda: nn.MultiHeadDotProductAttention(2, qkv_features=4, attention_fn=_attention),
        _call, (3, 5, 4)),
    'embed_tied': (lambda: nnx.Embed(7, 4, **R()), lambda: nn.Embed(7, 4), _embed_tied,
                   'tokens'),
    'batch_norm': (
        lambda: nnx.BatchNorm(3, use_running_average=False, **R()),
        lambda: nn.BatchNorm(use_running_average=False), _norm_head, (6, 2, 3)),
    'layer_norm': (lambda: nnx.LayerNorm(3, **R()), lambda: nn.LayerNorm(), _norm_head,
                   (6, 2, 3)),
    'rms_norm': (lambda: nnx.RMSNorm(3, **R()), lambda: nn.RMSNorm(), _norm_head, (6, 2, 3)),
    'group_norm': (lambda: nnx.GroupNorm(4, num_groups=2, **R()),
                   lambda: nn.GroupNorm(num_groups=2), _norm_head, (6, 2, 4)),
}


def _twin_inputs(shape):
  if shape == 'tokens':
    x = jnp.asarray(np.random.default_rng(1).integers(0, 7, (4, 3)))
    y = jnp.asarray(np.random.default_rng(2).integers(0, 7, (4, 3)))
    return x, y
  return _normal(1, shape), None


def _twins(name):
  """(nnx model, its loss, linen params with the same values, linen loss, nnx key -> linen key,
  input)."""
  make_nnx, make_linen, apply, shape = TWINS[name]
  x, labels = _twin_inputs(shape)
  model = _build(lambda: Net(make_nnx(), apply), seed=3)
  linen = LinenNet(make_linen, apply)
  variables = jax.eval_shape(lambda: linen.init(jax.random.key(0), x))
  linen_name = next(iter(variables['params']))
  rename = lambda k: linen_name + k[len('layer'):] if k.startswith('layer') else k
  params = _unflat({rename(k): v for k, v in _flat(nnx.state(model, nnx.Param)).items()})
  want = jax.tree.map(lambda s: s.shape, variables['params'])
  assert jax.tree.map(jnp.shape, params) == want, 'the twins do not have the same parameters'
  stats_init = {c: jax.tree.map(lambda s: jnp.ones(s.shape, jnp.float64), v)
                for c, v in variables.items() if c != 'params'}
  if labels is None:
    graphdef, state = nnx.split(model)
    target = _normal(2, jax.eval_shape(lambda s: nnx.merge(graphdef, s)(x), state).shape)
    loss = lambda out: kfax.squared_error(out, target)
  else:
    loss = lambda out: kfax.softmax_cross_entropy(out, labels)

  def nnx_loss(m, x):
    return loss(m(x))

  def linen_loss(p, x):
    out = linen.apply({'params': p, **stats_init}, x, mutable=list(stats_init))[0]
    return loss(out)

  return model, nnx_loss, params, linen_loss, rename, x


@pytest.mark.parametrize(
    'name, fisher, sequence',
    [(name, 'empirical', 'expand') for name in sorted(TWINS)] +
    [('embed_tied', 'mc', 'expand'), ('conv_grouped', 'mc', 'expand'),
     ('attention', 'empirical', 'reduce'), ('conv_circular', 'empirical', 'reduce')])
def test_nnx_layer_equals_its_linen_twin(x64, name, fisher, sequence):
  """An NNX layer and its linen twin: equal loss, gradients, table, statistics, kfac update."""
  model, nnx_loss, params, linen_loss, rename, x = _twins(name)
  f_nnx = kfax.value_grad_and_stats(nnx_loss, fisher=fisher, sequence=sequence)
  f_linen = kfax.value_grad_and_stats(linen_loss, fisher=fisher, sequence=sequence)
  t_nnx, t_linen = f_nnx.layers(model, x), f_linen.layers(params, x)

  renamed = {rename(k): e._replace(key=rename(k), leaves=tuple(map(rename, e.leaves)))
             for k, e in t_nnx.entries.items()}
  assert renamed == t_linen.entries
  assert {rename(k): s for k, s in t_nnx.shapes.items()} == t_linen.shapes
  assert all(e.curvature in ('kronecker', 'unitwise') for e in t_nnx.entries.values())

  graphdef, state = nnx.split(model)

  @_jit
  def run(state, params, x, rng):
    m = nnx.merge(graphdef, state)
    loss_n, grads_n, stats_n = f_nnx(m, x, rng=rng)
    loss_l, grads_l, stats_l = f_linen(params, x, rng=rng)
    u_n = _kfac_update(t_nnx, grads_n, nnx.state(m, nnx.Param), stats_n)
    u_l = _kfac_update(t_linen, grads_l, params, stats_l)
    return (loss_n, _flat(grads_n), stats_n, _flat(u_n)), (loss_l, grads_l, stats_l, u_l)

  (loss_n, grads_n, stats_n, u_n), (loss_l, grads_l, stats_l, u_l) = run(
      state, params, x, jax.random.key(1))
  _assert_rel(loss_n, loss_l, what='loss')
  _assert_trees(_unflat(grads_n), grads_l, rename=rename, what='grads')
  assert {rename(k) for k in stats_n} == set(stats_l)
  _assert_trees({rename(k): v for k, v in stats_n.items()}, stats_l, what='stats')
  assert jax.tree.leaves(stats_n)[0].dtype == jnp.float64
  _assert_trees(_unflat(u_n), u_l, UPDATE_TOL, rename=rename, what='update')


# ---------------------------------------------------------------------------------------------
# 2. Every parameter of a mixed NNX model gets curvature.


class Mixed(nnx.Module):
  """Conv, BatchNorm, Embed, MultiHeadAttention, LayerNorm and Linear in one classifier."""

  def __init__(self, rngs):
    self.bn = nnx.BatchNorm(2, rngs=rngs)  # before the conv: its bias would have no gradient
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.embed = nnx.Embed(6, 4, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(2, 4, decode=False, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, image, tokens):
    h = jax.nn.relu(self.conv(self.bn(image))).mean((1, 2))  # (N, 4)
    e = self.embed(tokens) + h[:, None, :]  # (N, T, 4)
    e = self.norm(e + self.attention(e))
    return self.head(e.mean(1))


def _mixed_batch(n=8):
  rng = np.random.default_rng(5)
  image = jnp.asarray(rng.standard_normal((n, 4, 4, 2)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 6, (n, 3)))
  labels = jnp.asarray(rng.integers(0, 3, (n,)))
  return image, tokens, labels


def _mixed_loss(model, image, tokens, labels):
  return kfax.softmax_cross_entropy(model(image, tokens), labels)


def test_every_parameter_of_a_mixed_nnx_model_gets_curvature():
  """No parameter falls back to the diagonal, and every parameter's update is preconditioned."""
  model = _build(lambda: Mixed(nnx.Rngs(0)), seed=1)
  batch = _mixed_batch()
  grad_fn = kfax.value_grad_and_stats(_mixed_loss, fisher='mc')
  table = grad_fn.layers(model, *batch)
  kinds = {k: (e.kind, e.curvature) for k, e in table.entries.items()}
  assert kinds == {
      'bn': ('norm', 'unitwise'), 'conv': ('conv', 'kronecker'),
      'embed': ('embed', 'kronecker'), 'norm': ('norm', 'unitwise'),
      'head': ('dense', 'kronecker'),
      **{f'attention/{p}': ('dense', 'kronecker') for p in ('query', 'key', 'value', 'out')}}
  covered = {leaf for e in table.entries.values() for leaf in e.leaves}
  assert covered == set(_flat(nnx.state(model, nnx.Param))) == set(table.shapes)

  graphdef, state = nnx.split(model)

  @_jit
  def run(state, batch, rng):
    m = nnx.merge(graphdef, state)
    _, grads, stats = grad_fn(m, *batch, rng=rng)
    # Attention's query G is ~1e-6 here: a larger damping would hide it behind the identity.
    params = nnx.state(m, nnx.Param)
    return _flat(grads), _flat(_kfac_update(table, grads, params, stats, damping=1e-8))

  grads, updates = run(state, batch, jax.random.key(0))
  scale = max(np.abs(g).max() for g in grads.values())
  for path, g in grads.items():
    if path == 'attention/key/bias':  # softmax is shift-invariant: no gradient to precondition
      assert np.abs(g).max() < 1e-5 * scale
      continue
    assert np.abs(g).max() > 1e-3 * scale, path
    assert _cosine(updates[path], g) < 0.999, path


# ---------------------------------------------------------------------------------------------
# 3. NNX transforms: the statistics of the unrolled twins.


class Block(nnx.Module):
  """A residual block: LayerNorm, then Linear."""

  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(3, rngs=rngs)
    self.lin = nnx.Linear(3, 3, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.lin(self.norm(x)))


DEPTH = 3


class Scanned(nnx.Module):
  """`DEPTH` blocks created by `nnx.vmap` (stacked parameters), applied by `nnx.scan`."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=DEPTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Block(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, x):
      return block(x)

    return self.head(body(self.blocks, x))


class Unrolled(nnx.Module):
  """`DEPTH` separate blocks in a list; the first through `nnx.remat` if `remat`."""

  def __init__(self, rngs, remat=False):
    self.blocks = nnx.List([Block(rngs) for _ in range(DEPTH)])
    self.head = nnx.Linear(3, 2, rngs=rngs)
    self.remat = remat

  def __call__(self, x):
    for i, block in enumerate(self.blocks):
      x = nnx.remat(lambda b, x: b(x))(block, x) if self.remat and i == 0 else block(x)
    return self.head(x)


def _unstack(flat, prefix, n):
  """Stacked leaves `prefix/rest` (leading axis n) as `prefix/i/rest`; other leaves unchanged."""
  out = {}
  for k, v in flat.items():
    if k.startswith(prefix + '/'):
      out.update({f'{prefix}/{i}{k[len(prefix):]}': v[i] for i in range(n)})
    else:
      out[k] = v
  return out


def _set_params(model, flat):
  """Sets `model`'s parameters to the arrays of `flat` ({'a/b': array}), checking the paths."""
  params = nnx.state(model, nnx.Param)
  assert set(_flat(params)) == set(flat)
  nnx.update(model, jax.tree_util.tree_map_with_path(
      lambda path, _: flat['/'.join(str(getattr(p, 'key', p)) for p in path)], nnx.to_pure_dict(
          params)))
  return model


def _regression(shape_x, shape_t):
  x, t = _normal(11, shape_x), _normal(12, shape_t)
  loss = lambda m, x, t: kfax.squared_error(m(x), t)
  return kfax.value_grad_and_stats(loss, fisher='empirical'), x, t


def _run(grad_fn, model, *args):
  """`grad_fn(model, *args)` under jit: (loss, flat grads, stats)."""
  graphdef, state = nnx.split(model)

  @_jit
  def run(state, args):
    loss, grads, stats = grad_fn(nnx.merge(graphdef, state), *args)
    return loss, _flat(grads), stats

  return run(state, args)


def test_nnx_scan_over_vmapped_blocks_gives_the_unrolled_per_layer_stats(x64):
  """Blocks stacked by `nnx.vmap` and run by `nnx.scan`: per-layer slices of the unrolled stats."""
  scanned = _build(lambda: Scanned(nnx.Rngs(0)), seed=4)
  unrolled = _build(lambda: Unrolled(nnx.Rngs(0)))
  _set_params(unrolled, _unstack(_flat(nnx.state(scanned, nnx.Param)), 'blocks', DEPTH))
  grad_fn, x, t = _regression((4, 3), (4, 2))

  table = grad_fn.layers(scanned, x, t)
  assert {k: (e.curvature, e.stack) for k, e in table.entries.items()} == {
      'blocks/lin': ('kronecker', (DEPTH,)), 'blocks/norm': ('unitwise', (DEPTH,)),
      'head': ('kronecker', ())}
  loss_s, grads_s, stats_s = _run(grad_fn, scanned, x, t)
  loss_u, grads_u, stats_u = _run(grad_fn, unrolled, x, t)
  _assert_rel(loss_s, loss_u, what='loss')
  _assert_trees(_unstack(grads_s, 'blocks', DEPTH), grads_u, what='grads')
  per_layer = _unstack({f'{k}/{n}': v for k, s in stats_s.items() for n, v in s.items()},
                       'blocks', DEPTH)
  _assert_trees(_unflat(per_layer), stats_u, what='stats')


def test_nnx_remat_gives_the_plain_stats(x64):
  """A block under `nnx.remat` has the same loss, gradients and statistics as without it."""
  plain = _build(lambda: Unrolled(nnx.Rngs(0)), seed=6)
  remat = _build(lambda: Unrolled(nnx.Rngs(0), remat=True), seed=6)
  grad_fn, x, t = _regression((4, 3), (4, 2))
  assert grad_fn.layers(remat, x, t) == grad_fn.layers(plain, x, t)
  loss_r, grads_r, stats_r = _run(grad_fn, remat, x, t)
  loss_p, grads_p, stats_p = _run(grad_fn, plain, x, t)
  _assert_rel(loss_r, loss_p, what='loss')
  _assert_trees(grads_r, grads_p, what='grads')
  _assert_trees(stats_r, stats_p, what='stats')


MEMBERS = 2


class Member(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


class Ensemble(nnx.Module):
  """`MEMBERS` models with stacked parameters, created and applied by `nnx.vmap`."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=MEMBERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Member(rngs)

    self.members = make(rngs)

  def __call__(self, x):
    return nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(self.members, x)


class EnsembleList(nnx.Module):
  """The unrolled twin: separate members, outputs stacked."""

  def __init__(self, rngs):
    self.members = nnx.List([Member(rngs) for _ in range(MEMBERS)])

  def __call__(self, x):
    return jnp.stack([m(x) for m in self.members])


def test_nnx_vmap_ensemble_gives_the_unrolled_per_member_stats(x64):
  """An `nnx.vmap` ensemble's statistics, member by member, equal those of separate members."""
  ensemble = _build(lambda: Ensemble(nnx.Rngs(0)), seed=7)
  separate = _build(lambda: EnsembleList(nnx.Rngs(0)))
  _set_params(separate, _unstack(_flat(nnx.state(ensemble, nnx.Param)), 'members', MEMBERS))
  grad_fn, x, t = _regression((5, 3), (MEMBERS, 5, 2))
  table = grad_fn.layers(ensemble, x, t)
  assert {k: (e.curvature, e.stack) for k, e in table.entries.items()} == {
      'members/hidden': ('kronecker', (MEMBERS,)), 'members/out': ('kronecker', (MEMBERS,))}
  loss_e, grads_e, stats_e = _run(grad_fn, ensemble, x, t)
  loss_s, grads_s, stats_s = _run(grad_fn, separate, x, t)
  _assert_rel(loss_e, loss_s, what='loss')
  _assert_trees(_unstack(grads_e, 'members', MEMBERS), grads_s, what='grads')
  per_member = _unstack({f'{k}/{n}': v for k, s in stats_e.items() for n, v in s.items()},
                        'members', MEMBERS)
  _assert_trees(_unflat(per_member), stats_s, what='stats')


# ---------------------------------------------------------------------------------------------
# 4. The contract.


class Classifier(nnx.Module):
  """Linear (no bias: BatchNorm follows), BatchNorm (training mode), optional Dropout, Linear."""

  def __init__(self, rngs, dropout=0.0):
    self.hidden = nnx.Linear(4, 8, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.bn(self.hidden(x)))
    if self.dropout is not None:
      h = self.dropout(h)
    return self.out(h)


def _classification(n=32):
  rng = np.random.default_rng(8)
  x = rng.standard_normal((n, 4))
  y = (x @ rng.standard_normal((4, 3))).argmax(-1)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


def _ce(model, x, y):
  return kfax.softmax_cross_entropy(model(x), y)


def _kfac_sgd(table):
  return optax.chain(kfax.kfac(table, norm_constraint=1e-2), optax.sgd(0.1, momentum=0.9))


def _optimizer(model, tx):
  """`nnx.Optimizer(model, tx, wrt=nnx.Param)`, its state initialised in one compiled call."""
  return nnx.jit(lambda m: nnx.Optimizer(m, tx, wrt=nnx.Param))(model)


STEPS = 4


@pytest.fixture(scope='module')
def nnx_jit_run():
  """STEPS steps under `nnx.jit` with `nnx.Optimizer`: (grad_fn, batch, model, optimizer, losses,
  Python traces of the step)."""
  x, y = _classification()
  grad_fn = kfax.value_grad_and_stats(_ce, fisher='mc')
  model = _build(lambda: Classifier(nnx.Rngs(0)), seed=9)
  optimizer = _optimizer(model, _kfac_sgd(grad_fn.layers(model, x, y)))
  traces = [0]

  @nnx.jit
  def step(model, optimizer, x, y, rng):
    traces[0] += 1
    loss, grads, stats = grad_fn(model, x, y, rng=rng)
    optimizer.update(model, grads, stats=stats)
    return loss

  losses = [float(step(model, optimizer, x, y, jax.random.key(i))) for i in range(STEPS)]
  return grad_fn, (x, y), model, optimizer, losses, traces[0]


def test_nnx_jit_train_step_with_nnx_optimizer_reduces_the_loss_and_traces_once(nnx_jit_run):
  """An `nnx.jit` step with `nnx.Optimizer` and `update(..., stats=)`: loss falls, one trace."""
  _, _, _, optimizer, losses, traces = nnx_jit_run
  assert traces == 1
  assert int(optimizer.step[...]) == STEPS
  assert isinstance(optimizer.opt_state[0], kfax.KfacState)
  assert int(optimizer.opt_state[0].count[...]) == STEPS
  assert all(b < a for a, b in itertools.pairwise(losses)), losses
  assert losses[-1] < 0.9 * losses[0], losses


def test_plain_jax_jit_with_split_and_merge_matches_nnx_jit(nnx_jit_run):
  """The same steps under `jax.jit` with `nnx.split` / `nnx.merge` give the same parameters."""
  grad_fn, (x, y), reference, _, ref_losses, _ = nnx_jit_run
  model = _build(lambda: Classifier(nnx.Rngs(0)), seed=9)
  initial = _flat(nnx.state(model, nnx.Param))
  optimizer = _optimizer(model, _kfac_sgd(grad_fn.layers(model, x, y)))
  graphdef, state = nnx.split((model, optimizer))
  traces = [0]

  @_jit  # jax.jit, with LLVM's optimisations off (compile time)
  def step(state, x, y, rng):
    traces[0] += 1
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads, stats = grad_fn(model, x, y, rng=rng)
    optimizer.update(model, grads, stats=stats)
    return loss, nnx.state((model, optimizer))

  losses = []
  for i in range(STEPS):
    loss, state = step(state, x, y, jax.random.key(i))
    losses.append(float(loss))
  nnx.update((model, optimizer), state)
  assert traces[0] == 1
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  expected = _flat(nnx.state(reference, (nnx.Param, nnx.BatchStat)))
  actual = _flat(nnx.state(model, (nnx.Param, nnx.BatchStat)))
  assert set(actual) == set(expected)
  for path, value in expected.items():
    np.testing.assert_allclose(actual[path], value, rtol=1e-5, atol=1e-6, err_msg=path)
  assert sum(np.abs(expected[p] - initial[p]).sum() for p in initial) > 1e-2  # it trained


def test_has_aux_returns_the_aux_and_the_same_grads_and_stats():
  """`has_aux=True`: (loss, aux) with the aux of the loss, and unchanged grads and statistics."""
  model = _build(lambda: Mixed(nnx.Rngs(0)), seed=1)
  image, tokens, labels = _mixed_batch()

  def with_aux(m, image, tokens, labels):
    logits = m(image, tokens)
    return kfax.softmax_cross_entropy(logits, labels), {'logits': logits}

  plain_fn = kfax.value_grad_and_stats(_mixed_loss, fisher='mc')
  aux_fn = kfax.value_grad_and_stats(with_aux, fisher='mc', has_aux=True)
  assert aux_fn.layers(model, image, tokens, labels) == plain_fn.layers(
      model, image, tokens, labels)
  graphdef, state = nnx.split(model)

  @_jit
  def run(state, rng):
    (loss, aux), grads, stats = aux_fn(nnx.merge(graphdef, state), image, tokens, labels,
                                       rng=rng)
    ref_loss, ref_grads, ref_stats = plain_fn(nnx.merge(graphdef, state), image, tokens,
                                              labels, rng=rng)
    logits = nnx.merge(graphdef, state)(image, tokens)
    return (loss, aux, _flat(grads), stats), (ref_loss, {'logits': logits}, _flat(ref_grads),
                                              ref_stats)

  (loss, aux, grads, stats), (ref_loss, ref_aux, ref_grads, ref_stats) = run(
      state, jax.random.key(3))
  assert np.asarray(aux['logits']).shape == (8, 3)
  for name, a, b in (('loss', loss, ref_loss), ('aux', aux, ref_aux), ('grads', grads, ref_grads),
                     ('stats', stats, ref_stats)):
    _assert_trees({'v': a}, {'v': b}, 1e-6, what=name)


def test_batch_norm_running_stats_equal_those_of_nnx_value_and_grad():
  """One kfax call (nnx.jit) moves BatchNorm's running statistics as nnx.value_and_grad does."""
  x, y = _classification()
  model = _build(lambda: Classifier(nnx.Rngs(0)), seed=9)
  reference = nnx.clone(model)
  before = _flat(nnx.state(model, nnx.BatchStat))
  grad_fn = kfax.value_grad_and_stats(_ce, fisher='mc')
  loss, grads, _ = nnx.jit(lambda m: grad_fn(m, x, y, rng=jax.random.key(0)))(model)
  ref_loss, ref_grads = nnx.jit(lambda m: nnx.value_and_grad(_ce)(m, x, y))(reference)
  after, ref_after = _flat(nnx.state(model, nnx.BatchStat)), _flat(
      nnx.state(reference, nnx.BatchStat))
  assert set(after) == set(ref_after) == {'bn/mean', 'bn/var'}
  for path in after:
    assert np.abs(np.asarray(ref_after[path]) - np.asarray(before[path])).max() > 1e-3, path
    np.testing.assert_allclose(after[path], ref_after[path], rtol=1e-6, err_msg=path)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  _assert_trees(grads, ref_grads, 1e-5, what='grads')
  # The user's model is not capture's tapped copy: same classes, attributes and variables.
  for (path, module), (_, ref) in zip(nnx.iter_modules(model), nnx.iter_modules(reference)):
    assert type(module) is type(ref) and set(vars(module)) == set(vars(ref)), path
  assert set(_flat(nnx.state(model))) == set(_flat(nnx.state(reference)))


def test_dropout_draws_as_many_keys_as_nnx_value_and_grad():
  """kfax consumes no extra RNG draws: RNG counts, loss and gradients as nnx.value_and_grad's."""
  x, y = _classification()
  model = _build(lambda: Classifier(nnx.Rngs(0), dropout=0.5), seed=9)
  reference = nnx.clone(model)
  grad_fn = kfax.value_grad_and_stats(_ce, fisher='mc')
  counts = lambda m: {k: int(v) for k, v in _flat(nnx.state(m, nnx.RngCount)).items()}
  before = counts(model)
  assert before  # the Dropout's stream
  kfax_step = nnx.jit(lambda m, rng: grad_fn(m, x, y, rng=rng))
  ref_step = nnx.jit(lambda m: nnx.value_and_grad(_ce)(m, x, y))
  for i in range(2):
    loss, grads, _ = kfax_step(model, jax.random.key(i))
    ref_loss, ref_grads = ref_step(reference)
    assert counts(model) == counts(reference) != before
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    _assert_trees(grads, ref_grads, 1e-5, what='grads')


class CallRngs(nnx.Module):
  """Dropout without stored RNGs: the caller passes `rngs` (the keep_rngs=False pattern)."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.dropout = nnx.Dropout(0.5)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x, rngs):
    return self.out(self.dropout(jnp.tanh(self.hidden(x)), rngs=rngs))


def test_an_nnx_rngs_argument_of_the_loss_draws_as_nnx_value_and_grad():
  """An `nnx.Rngs` passed to the loss: the same draws, loss and gradients as nnx.value_and_grad."""
  x, y = _classification()
  model = _build(lambda: CallRngs(nnx.Rngs(0)), seed=9)
  loss_fn = lambda m, x, y, rngs: kfax.softmax_cross_entropy(m(x, rngs), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='mc')
  rngs, ref_rngs = nnx.Rngs(dropout=1), nnx.Rngs(dropout=1)
  assert grad_fn.layers(model, x, y, rngs) == grad_fn.layers(model, x, y, ref_rngs)
  assert int(rngs.dropout.count[...]) == 0  # the shape-only trace draws on a copy
  loss, grads, _ = nnx.jit(lambda m, r: grad_fn(m, x, y, r, rng=jax.random.key(0)))(model, rngs)
  ref_loss, ref_grads = nnx.jit(lambda m, r: nnx.value_and_grad(loss_fn)(m, x, y, r))(
      model, ref_rngs)
  assert int(rngs.dropout.count[...]) == int(ref_rngs.dropout.count[...]) == 1
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  _assert_trees(grads, ref_grads, 1e-5, what='grads')


def test_an_nnx_state_instead_of_the_model_raises_a_type_error():
  """`nnx.state(model)` (or its params) is not a model: a clear TypeError, not silent fallback."""
  x, y = _classification()
  model = _build(lambda: Classifier(nnx.Rngs(0)), seed=9)
  grad_fn = kfax.value_grad_and_stats(_ce, fisher='mc')
  for state in (nnx.state(model), nnx.state(model, nnx.Param), nnx.split(model)[1]):
    with pytest.raises(TypeError, match='pass the nnx.Module itself'):
      grad_fn.layers(state, x, y)
    with pytest.raises(TypeError, match='pass the nnx.Module itself'):
      grad_fn(state, x, y, rng=jax.random.key(0))


class DigitsMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 32, rngs=rngs)
    self.out = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def test_kfac_trains_an_nnx_model_on_digits_faster_than_sgd():
  """20 full-batch steps on 512 digits: K-FAC + SGD reaches a fraction of SGD's loss."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = jnp.asarray(digits.data[:512] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:512])
  grad_fn = kfax.value_grad_and_stats(_ce, fisher='mc')

  model = _build(lambda: DigitsMLP(nnx.Rngs(0)), seed=10, scale=0.15)
  graphdef, state = nnx.split(model)
  table = grad_fn.layers(model, x, y)

  def train(use_kfac):
    @_jit
    def run(state):
      model = nnx.merge(graphdef, state)
      sgd = optax.sgd(0.1, momentum=0.9)
      optimizer = nnx.Optimizer(model, _kfac_sgd(table) if use_kfac else sgd, wrt=nnx.Param)
      both, carry = nnx.split((model, optimizer))

      def one(carry, rng):
        model, optimizer = nnx.merge(both, carry)
        if use_kfac:
          _, grads, stats = grad_fn(model, x, y, rng=rng)
          optimizer.update(model, grads, stats=stats)
        else:
          optimizer.update(model, nnx.grad(_ce)(model, x, y))
        return nnx.state((model, optimizer)), None

      carry = jax.lax.scan(one, carry, jax.random.split(jax.random.key(0), 20))[0]
      model, _ = nnx.merge(both, carry)
      return _ce(model, x, y), (model(x).argmax(-1) == y).mean()

    return tuple(map(float, run(state)))

  (kfac_loss, kfac_acc), (sgd_loss, sgd_acc) = train(True), train(False)
  assert kfac_loss < 0.2 * sgd_loss, (kfac_loss, sgd_loss)
  assert kfac_acc > sgd_acc, (kfac_acc, sgd_acc)


def test_layers_inside_nnx_weight_and_spectral_norm_fall_back_with_the_reason():
  """nnx.WeightNorm / nnx.SpectralNorm hand their layer a transformed kernel: K-FAC of the
  stored one would be wrong, so those layers get the diagonal fallback, and the summary says
  why; the layer after them is still captured."""

  class Wrapped(nnx.Module):
    def __init__(self, rngs):
      self.sn = nnx.SpectralNorm(nnx.Linear(3, 4, rngs=rngs), rngs=rngs)
      self.wn = nnx.WeightNorm(nnx.Linear(4, 4, rngs=rngs), rngs=rngs)
      self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
      return self.out(self.wn(self.sn(x, update_stats=True)))

  x, y = jnp.ones((5, 3)), jnp.zeros(5, jnp.int32)
  table = kfax.value_grad_and_stats(_ce).layers(Wrapped(nnx.Rngs(0)), x, y)
  for key, wrapper in (('sn', 'SpectralNorm'), ('wn', 'WeightNorm')):
    entry = table.entries[f'{key}/layer_instance/kernel']
    assert entry.curvature == 'diagonal' and f'inside {wrapper}' in entry.note
  assert table.entries['out'].curvature == 'kronecker'
