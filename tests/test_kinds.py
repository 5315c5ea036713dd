"""Layer kinds against independent references.

1. Every kind's curvature equals the exact per-example (empirical) Fisher where the approximation
   is exact, computed with `jax.jacobian` of the per-example losses in float64 and laid out by
   hand here (not by kfax's `Reshape`s), so a wrong layout fails too.
2. K-FAC-expand and K-FAC-reduce (Eschenhagen et al., "Kronecker-Factored Approximate Curvature
   for Modern Neural Network Architectures", NeurIPS 2023), each exact in its own regime and
   wrong in the other's.
3. Every flax.linen Module class, found by introspection, is classified: each parameter is either
   captured with curvature or gets the fallback, and table, state and statistics agree.
4. Lifted transforms (remat, scan, vmap, jit, RNN), boxed parameters, reparameterised kernels.
5. The API contract: errors, the loss's own `rng`, non-finite gradients, the summary, `where=`,
   `fallback="none"`, `max_factor_dim`.

Under x64 the statistics are float64, so float64 references are compared within 1e-9 of
their largest entry. Every
graph runs once, so it is compiled without LLVM optimisations, and models are initialised from
shapes only: compile time is what this file costs.
"""

import contextlib
import inspect
import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax import _kinds

TOL = 1e-9  # relative to the largest entry: float64 statistics (x64) against float64 references


# ---------------------------------------------------------------------------------------------
# Helpers.


# These graphs run once: compile time is the cost, so LLVM's optimisations are off.
_FAST = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _jit(fn):
  return jax.jit(fn, compiler_options=_FAST)


def _normal(seed, shape, dtype=jnp.float64):
  """Seeded standard normal values (numpy: no compile per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _init(model, *args, **kwargs):
  """`model`'s variables from a shape-only init (no compile): parameters normal / 2 (seeded),
  every other collection ones (running statistics, SpectralNorm's vectors, fp8 scales)."""
  shapes = jax.eval_shape(lambda key: model.init(key, *args, **kwargs), jax.random.key(0))
  rng = np.random.default_rng(0)

  def fill(collection, leaf):
    shape = leaf.shape
    values = 0.5 * rng.standard_normal(shape) if collection == 'params' else np.ones(shape)
    return jnp.asarray(values, leaf.dtype)

  return {c: jax.tree.map(lambda leaf, c=c: fill(c, leaf), v) for c, v in shapes.items()}


def _params(model, *args):
  """float64 parameters of `model` (for the x64 tests)."""
  params = _init(model, *args)['params']
  return jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64)), params)


def _sq_terms(y, t):
  """The per-example terms ℓ_n of `kfax.squared_error(y, t)` (its examples: every position of
  `y` but the last axis), so that the loss is their mean."""
  return 0.5 * jnp.sum((y - t) ** 2, axis=-1).reshape(-1)


def _sub(tree, key):
  for part in key.split('/') if key else ():
    tree = tree[part]
  return tree


def _per_example(example_losses, params, layout):
  """(N, B, D): per example, per block, the row-major vec of its loss gradient laid out by
  `layout(gradient tree) -> (B, rows, cols)`."""
  jac = _jit(jax.jacobian(example_losses))(params)
  n = jax.tree.leaves(jac)[0].shape[0]
  rows = [np.asarray(layout(jax.tree.map(lambda j, i=i: j[i], jac)), np.float64)
          for i in range(n)]
  return np.stack([r.reshape(r.shape[0], -1) for r in rows])


def _fisher(per):
  """The diagonal blocks (B, D, D) of the empirical Fisher (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ."""
  return np.einsum('nbi,nbj->bij', per, per) / per.shape[0]


def _full_fisher(per):
  flat = per.reshape(per.shape[0], -1)
  return flat.T @ flat / per.shape[0]


def _block_diag(blocks):
  b, d = blocks.shape[0], blocks.shape[-1]
  out = np.zeros((b * d, b * d))
  for i in range(b):
    out[i * d:(i + 1) * d, i * d:(i + 1) * d] = blocks[i]
  return out


def _square(m, block_axes):
  """A side as (B, n, n): a diagonal side (one axis fewer) becomes its diagonal matrix."""
  m = np.asarray(m, np.float64)
  if m.ndim - block_axes == 1:
    m = np.vectorize(np.diag, signature='(n)->(n,n)')(m)
  return m.reshape((-1,) + m.shape[-2:])


def _kron(stats, block_axes=0):
  """Per block `A ⊗ G` (B, D, D), for the row-major vec of (rows, cols) gradient blocks."""
  a, g = _square(stats['a_factor'], block_axes), _square(stats['g_factor'], block_axes)
  return np.stack([np.kron(x, y) for x, y in zip(a, g)])


def _assert_rel(actual, expected, tol=TOL, what=''):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  scale = np.abs(expected).max()
  assert scale > 0, f'{what}: degenerate reference'
  err = np.abs(actual - expected).max()
  assert err <= tol * scale, f'{what}: max error {err:.3g} vs scale {scale:.3g}'


def _rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.abs(actual - expected).max() / np.abs(expected).max()


def _stats(loss_fn, params, *args, rng=None, **options):
  """`kfax.value_grad_and_stats(loss_fn, **options)(params, *args, rng=rng)` under jit;
  fisher='empirical' unless given."""
  options.setdefault('fisher', 'empirical')
  f = kfax.value_grad_and_stats(loss_fn, **options)
  return _jit(lambda p, a, r: f(p, *a, rng=r))(params, args, rng)


def _sequences(loss_fn, params, update=False):
  """{'expand': stats, 'reduce': stats} (empirical Fisher), in one compiled call; with `update`
  also the expand gradients, one K-FAC update from them (eigen damping λ, no norm constraint:
  exactly `(F + λ I)⁻¹ g` per curvature block) and λ, a tenth of the largest curvature entry."""
  fs = {s: kfax.value_grad_and_stats(loss_fn, fisher='empirical', sequence=s)
        for s in ('expand', 'reduce')}
  table = fs['expand'].layers(params)

  def run(p):
    out = {s: f(p) for s, f in fs.items()}
    stats = {s: o[2] for s, o in out.items()}
    if not update:
      return stats
    grads = out['expand'][1]
    scale = lambda e: math.prod(jnp.max(jnp.abs(v)) for v in e.values())
    lam = 0.1 * jnp.max(jnp.stack([scale(e) for e in stats['expand'].values()]))
    tx = kfax.kfac(table, damping=lam, damping_mode='eigen', norm_constraint=None)
    updates, _ = tx.update(grads, tx.init(p), p, stats=stats['expand'])
    return stats, grads, updates, lam

  return _jit(run)(params)


def _assert_preconditioned(curvature, grads, updates, lam):
  """`updates` (B, rows, cols) is `(C_b + λ I)⁻¹ vec(grads_b)` per block, `curvature` (B, D, D)
  the curvature of the statistics in the test's own layout: kfax lays out and preconditions the
  parameters as the statistics say."""
  g = np.asarray(grads, np.float64).reshape(curvature.shape[0], -1)
  u = np.asarray(updates, np.float64).reshape(g.shape)
  ref = np.stack([np.linalg.solve(c + float(lam) * np.eye(c.shape[0]), v)
                  for c, v in zip(curvature, g)])
  _assert_rel(u, ref, 1e-4, 'update')


def _exact(apply, params, t, key, layout, block_axes=0, blocks=None):
  """Under `kfax.squared_error(apply(p), t)`: layer `key`'s statistics by sequence mode, their
  curvature per block in the test's layout (`blocks(stats)`, by default `A ⊗ G`), and the
  per-example gradients of the exact reference (by `layout`). On the way, checks the layer's
  K-FAC update against `(curvature + λ I)⁻¹ g` in the same layout."""
  stats, grads, updates, lam = _sequences(lambda p: kfax.squared_error(apply(p), t), params,
                                          update=True)
  per = _per_example(lambda p: _sq_terms(apply(p), t), params, lambda g: layout(_sub(g, key)))
  stats = {s: v[key] for s, v in stats.items()}
  blocks = blocks or (lambda s: _kron(s, block_axes))
  approx = {s: blocks(v) for s, v in stats.items()}
  _assert_preconditioned(approx['expand'], layout(_sub(grads, key)), layout(_sub(updates, key)),
                         lam)
  return stats, approx, per


def _linear_block(kernel, bias):
  """[kernel reshaped to (-1, out); bias row]: one (rows, cols) block."""
  rows = [kernel.reshape(-1, kernel.shape[-1])]
  if bias is not None:
    rows.append(bias.reshape(1, -1))
  return jnp.concatenate(rows)


# ---------------------------------------------------------------------------------------------
# 1. Each kind against the exact per-example Fisher.


def _assert_exact(approx, exact, modes=('expand', 'reduce')):
  """Both sequence modes: with one row per example they coincide, and both are exact."""
  for mode in modes:
    _assert_rel(approx[mode], exact, what=mode)


def test_dense_general_over_two_axes_is_exact_for_one_example(x64):
  """DenseGeneral(axis=(-2, -1)) on one example: its gradient is a ⊗ ĝ with a the flattened
  (2, 3) input, so A ⊗ G is the whole exact Fisher (kernel rows in input-axis order, bias last)."""
  model = nn.DenseGeneral(4, axis=(-2, -1))
  x, t = _normal(0, (1, 2, 3)), _normal(1, (1, 4))
  params = _params(model, x)
  apply = lambda p: model.apply({'params': p}, x)
  layout = lambda g: _linear_block(g['kernel'], g['bias'])[None]
  stats, approx, per = _exact(apply, params, t, '', layout)
  assert stats['expand']['a_factor'].shape == (7, 7)
  assert stats['expand']['g_factor'].shape == (4, 4)
  _assert_exact(approx, _fisher(per))


def test_dense_general_batch_dims_is_exact_per_position(x64):
  """DenseGeneral(batch_dims=(0,)): one weight block per batch index b; with one row per block
  and a loss per position, ∇ℓ_b touches only block b, so the exact Fisher is block diagonal and
  each block is A_b ⊗ G_b (G_b = N dy dyᵀ with N = 3 positions, dy = ĝ/N)."""
  model = nn.DenseGeneral(4, axis=-1, batch_dims=(0,))
  x, t = _normal(0, (3, 1, 2)), _normal(1, (3, 1, 4))
  params = _params(model, x)
  assert params['kernel'].shape == (3, 2, 4) and params['bias'].shape == (3, 4)
  apply = lambda p: model.apply({'params': p}, x)
  layout = lambda g: jnp.stack([_linear_block(g['kernel'][b], g['bias'][b]) for b in range(3)])
  stats, approx, per = _exact(apply, params, t, '', layout, block_axes=1)
  assert stats['expand']['a_factor'].shape == (3, 3, 3)
  assert stats['expand']['g_factor'].shape == (3, 4, 4)
  _assert_exact({m: _block_diag(a) for m, a in approx.items()}, _full_fisher(per))


def test_einsum_is_exact_for_one_example(x64):
  """Einsum 'bi,io->bo' (a Dense written as an equation), one example: A ⊗ G is the Fisher."""
  model = nn.Einsum((3, 4), 'bi,io->bo')
  x, t = _normal(0, (1, 3)), _normal(1, (1, 4))
  params = _params(model, x)
  apply = lambda p: model.apply({'params': p}, x)
  layout = lambda g: _linear_block(g['kernel'], g['bias'])[None]
  _, approx, per = _exact(apply, params, t, '', layout)
  _assert_exact(approx, _fisher(per))


def test_einsum_with_a_batch_letter_is_exact_per_position(x64):
  """Einsum 'nhi,iho->nho': `h` is in input, kernel and output (a block per head), and the
  kernel holds it second, so kfax must permute it to the front. One row per head and a loss per
  (n, h) position: the exact Fisher is block diagonal with blocks A_h ⊗ G_h."""
  model = nn.Einsum((3, 2, 4), 'nhi,iho->nho')
  x, t = _normal(0, (1, 2, 3)), _normal(1, (1, 2, 4))
  params = _params(model, x)
  assert params['bias'].shape == (2, 4)
  apply = lambda p: model.apply({'params': p}, x)
  layout = lambda g: jnp.stack([_linear_block(g['kernel'][:, h], g['bias'][h])
                                for h in range(2)])
  stats, approx, per = _exact(apply, params, t, '', layout, block_axes=1)
  assert stats['expand']['a_factor'].shape == (2, 4, 4)
  _assert_exact({m: _block_diag(a) for m, a in approx.items()}, _full_fisher(per))


def test_embed_lookup_of_one_token_is_exact(x64):
  """Embed: the gradient of one looked-up token t is e_t ⊗ ĝ, so diag(A) ⊗ G with A = e_t (the
  token's count) is the exact Fisher of the whole table."""
  model = nn.Embed(5, 3)
  tokens, t = jnp.array([[2]]), _normal(1, (1, 1, 3))
  params = _params(model, tokens)
  apply = lambda p: model.apply({'params': p}, tokens)
  stats, approx, per = _exact(apply, params, t, '', lambda g: g['embedding'][None])
  assert stats['expand']['a_factor'].shape == (5,)
  np.testing.assert_array_equal(stats['expand']['a_factor'], np.eye(5)[2])
  _assert_exact(approx, _fisher(per))


def test_embed_lookup_token_counts(x64):
  """Embed A is diagonal: expand, the token counts over all M = 6 lookups / M; reduce, the mean
  over examples of the squared per-example frequencies. G = N Σ dy dyᵀ (rows, or per-example
  sums) with N = 6 positions of the loss."""
  model = nn.Embed(5, 3)
  tokens = jnp.array([[1, 2, 2], [4, 1, 1]])
  t = _normal(1, (2, 3, 3))
  params = _params(model, tokens)
  stats = _sequences(lambda p: kfax.squared_error(model.apply({'params': p}, tokens), t), params)
  dy = np.asarray(jax.grad(lambda y: kfax.squared_error(y, t))(params['embedding'][tokens]))
  freq = np.stack([np.bincount(np.asarray(r), minlength=5) for r in tokens])
  _assert_rel(stats['expand']['']['a_factor'], freq.sum(0) / 6)
  _assert_rel(stats['expand']['']['g_factor'], 6 * np.einsum('eti,etj->ij', dy, dy))
  _assert_rel(stats['reduce']['']['a_factor'], ((freq / 3) ** 2).mean(0))
  _assert_rel(stats['reduce']['']['g_factor'], 6 * dy.sum(1).T @ dy.sum(1))


def test_embed_attend_is_exact_on_token_blocks(x64):
  """Embed.attend, y = x Eᵀ (a tied output layer): ∇E = ĝ ⊗ x (tokens are rows). kfax keeps the
  token side diagonal, A = N diag(Σ dy²), G = (1/M) Σ x xᵀ, which for one example is exactly the
  Fisher's token-diagonal blocks ĝ_v² x xᵀ."""

  class Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Embed(5, 3, name='embed').attend(x)

  model = Tied()
  x, t = _normal(0, (1, 3)), _normal(1, (1, 5))
  params = _params(model, x)
  apply = lambda p: model.apply({'params': p}, x)
  # (5, 1, 3): each token's row of the gradient is its own block, a_v G.
  per_token = lambda s: np.stack([float(a) * np.asarray(s['g_factor'], np.float64)
                                  for a in np.asarray(s['a_factor'])])
  stats, approx, per = _exact(apply, params, t, 'embed', lambda g: g['embedding'][:, None],
                              blocks=per_token)
  assert stats['expand']['a_factor'].shape == (5,)
  assert stats['expand']['g_factor'].shape == (3, 3)
  _assert_exact(approx, _fisher(per))


@pytest.mark.parametrize('groups, features', [(2, 6), (4, 8)], ids=['grouped', 'depthwise'])
def test_grouped_conv_blocks_are_exact_at_one_output_position(x64, groups, features):
  """Conv(feature_group_count=g) with exactly one output position (a VALID (2, 3) kernel on a
  2x3 image) and one example: group b's gradient is a_b ⊗ ĝ_b, a_b its (2, 3, C/g) patch, so
  each A_b ⊗ G_b is the exact diagonal block of group b. (Blocks of different groups are
  coupled through the loss; K-FAC drops those.) Depthwise: g = C = 4, multiplier 2."""
  c = 4
  cg, og = c // groups, features // groups
  model = nn.Conv(features, (2, 3), feature_group_count=groups, padding='VALID')
  x, t = _normal(0, (1, 2, 3, c)), _normal(1, (1, features))
  params = _params(model, x)
  apply = lambda p: model.apply({'params': p}, x).reshape(1, features)
  layout = lambda g: jnp.stack([_linear_block(g['kernel'][..., b * og:(b + 1) * og],
                                              g['bias'][b * og:(b + 1) * og])
                                for b in range(groups)])
  stats, approx, per = _exact(apply, params, t, '', layout, block_axes=1)
  assert stats['expand']['a_factor'].shape == (groups, 6 * cg + 1, 6 * cg + 1)
  assert stats['expand']['g_factor'].shape == (groups, og, og)
  _assert_exact(approx, _fisher(per))


def _conv_patches(model, params, x, groups):
  """(E, T, B, K*C/B) input patches of a (transposed, grouped) conv, by `jax.jacobian` of its
  output w.r.t. its kernel: the layer is linear in the kernel, output channel o of group b is
  Σ_t patch_b(t) · kernel[..., o], so d y[e, t, o] / d kernel[..., :, o] is the patch."""
  kernel = params['kernel']
  out = kernel.shape[-1]
  og = out // groups
  jac = _jit(jax.jacobian(lambda k: model.apply({'params': {**params, 'kernel': k}}, x)))(kernel)
  blocks = []
  for b in range(groups):
    j = jnp.take(jac, b * og, axis=x.ndim - 1)[..., b * og]  # (E, *out, *window, C/B)
    blocks.append(np.asarray(j).reshape(x.shape[0], -1, kernel.size // out))
  return np.stack(blocks, axis=2)


CONVS = {
    'transpose_same_stride2': (lambda: nn.ConvTranspose(3, (3, 3), strides=(2, 2)),
                               (2, 3, 3, 2)),
    'transpose_valid_1d': (lambda: nn.ConvTranspose(2, (3,), strides=(2,), padding='VALID'),
                           (2, 4, 3)),
    'circular': (lambda: nn.Conv(3, (3, 3), padding='CIRCULAR'), (2, 3, 4, 2)),
    'reflect_strided': (lambda: nn.Conv(3, (3, 3), strides=2, padding='REFLECT'), (2, 5, 5, 2)),
    'causal_dilated_1d': (lambda: nn.Conv(2, (3,), padding='CAUSAL', kernel_dilation=2),
                          (2, 6, 3)),
    'grouped_input_dilated': (lambda: nn.Conv(4, (2, 2), feature_group_count=2,
                                              input_dilation=2, padding=((1, 1), (0, 1)),
                                              use_bias=False), (2, 3, 3, 4)),
}


@pytest.mark.parametrize('name', sorted(CONVS))
def test_conv_factors_equal_dense_patch_references(x64, name):
  """A and G of convolutions (ConvTranspose, REFLECT/CIRCULAR/CAUSAL/explicit padding, strides,
  dilations, groups) from patches built by `jax.jacobian` (no im2col, no padding rules):
  expand A = (1/(E T)) Σ [p; 1][p; 1]ᵀ, G = N Σ dy dyᵀ; reduce A = (1/E) Σ_e ā ā ᵀ, G = N Σ_e s sᵀ
  (ā the mean row of example e, s its summed dy), N = E examples of the pooled loss."""
  make, shape = CONVS[name]
  model = make()
  x = _normal(0, shape)
  params = _params(model, x)
  groups = model.feature_group_count if isinstance(model, nn.Conv) else 1
  y = model.apply({'params': params}, x)
  t = _normal(1, (shape[0], y.shape[-1]))
  head = lambda y: kfax.squared_error(jnp.tanh(y).mean(tuple(range(1, y.ndim - 1))), t)
  stats = _sequences(lambda p: head(model.apply({'params': p}, x)), params)
  patches = _conv_patches(model, params, x, groups)  # (E, T, B, d)
  if 'bias' in params:
    patches = np.concatenate([patches, np.ones(patches.shape[:-1] + (1,))], axis=-1)
  e, rows = patches.shape[:2]
  dy = np.asarray(jax.grad(head)(y)).reshape(e, rows, groups, -1)
  squeeze = (lambda m: m[0]) if groups == 1 else (lambda m: m)
  for mode in ('expand', 'reduce'):
    a, g = patches, dy
    if mode == 'reduce':
      a, g = a.mean(1, keepdims=True), g.sum(1, keepdims=True)
    ref_a = np.einsum('etbi,etbj->bij', a, a) / (a.shape[0] * a.shape[1])
    ref_g = e * np.einsum('etbi,etbj->bij', g, g)
    _assert_rel(stats[mode]['']['a_factor'], squeeze(ref_a), what=f'{mode} A')
    _assert_rel(stats[mode]['']['g_factor'], squeeze(ref_g), what=f'{mode} G')


def test_conv_patches_fall_back_to_the_conv_per_channel_where_an_output_sums_inputs():
  """Patches are a gather at the positions the layer's one-hot conv reads; a patch map with an
  output that is a sum of inputs (here two shifted copies) is not a gather, and is applied per
  channel instead, giving the same patches as the map itself."""
  conv = lambda k, x: jax.lax.conv_general_dilated(
      x, k, (1,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC'))
  x = _normal(0, (2, 5, 3), jnp.float32)
  for summing in (False, True):
    patch = (lambda k, x: conv(k, x) + conv(k, jnp.roll(x, 1, axis=1))) if summing else conv
    config = _kinds.ConvConfig(patch, (3,), 1, 3, False)
    assert (_kinds.patch_positions(config, (5,)) is None) == summing
    onehot = jnp.eye(3).reshape(3, 1, 3)
    want = jax.vmap(lambda xc: patch(onehot, xc[..., None]), in_axes=-1, out_axes=-1)(x)
    np.testing.assert_array_equal(_kinds.conv_patches(config, x), want.reshape(2, 5, 9))


NORMS = {
    # name: (module, input shape, needs mutable batch_stats, one row per example)
    'LayerNorm': (lambda: nn.LayerNorm(), (3, 5), False, True),
    'RMSNorm': (lambda: nn.RMSNorm(), (3, 5), False, True),
    'LayerNorm_seq': (lambda: nn.LayerNorm(), (3, 4, 5), False, False),
    'RMSNorm_seq': (lambda: nn.RMSNorm(), (3, 4, 5), False, False),
    'LayerNorm_two_feature_axes': (
        lambda: nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1)), (3, 2, 4), False,
        True),
    'GroupNorm': (lambda: nn.GroupNorm(num_groups=2), (3, 2, 3, 4), False, False),
    'InstanceNorm': (lambda: nn.InstanceNorm(), (3, 2, 3, 4), False, False),
    'BatchNorm_train': (lambda: nn.BatchNorm(use_running_average=False), (3, 2, 3, 4), True,
                        False),
    'BatchNorm_channels_first': (lambda: nn.BatchNorm(use_running_average=False, axis=1),
                                 (3, 4, 2, 3), True, False),
    'BatchNorm_eval': (lambda: nn.BatchNorm(use_running_average=True), (3, 2, 3, 4), False,
                       False),
}


def _norm_setup(name):
  make, shape, mutable, _ = NORMS[name]
  model = make()
  x = _normal(0, shape) * 2.0 + 0.5
  variables = _init(model, x)
  params = jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64)), variables['params'])
  rest = {k: jax.tree.map(lambda v: jnp.asarray(v, jnp.float64), v)
          for k, v in variables.items() if k != 'params'}
  if 'batch_stats' in rest and not mutable:  # running statistics that are not the batch's
    rest['batch_stats'] = {'mean': _normal(3, (shape[-1],)),
                           'var': 0.5 + jnp.exp(_normal(4, (shape[-1],)))}

  def apply(p):
    out = model.apply({'params': p, **rest}, x, mutable=['batch_stats'] if mutable else False)
    y = out[0] if mutable else out
    if y.ndim > 2:  # pooled: an example-level output from all of the example's positions
      y = jnp.tanh(y).mean(tuple(range(1, y.ndim - 1)))
    return y

  names = tuple(n for n in ('scale', 'bias') if n in params)
  layout = lambda g: jnp.stack([g[n].reshape(-1) for n in names], axis=-1)[:, None, :]
  t = _normal(1, jax.eval_shape(apply, params).shape)
  return apply, params, t, layout


@pytest.mark.parametrize('name', sorted(NORMS))
def test_norm_unitwise_blocks_equal_the_exact_fisher(x64, name):
  """Unit-wise (scale_c, bias_c) blocks of every norm (channels last or first, one or two
  feature axes) equal the diagonal 2x2 (1x1 for RMSNorm) blocks of the exact empirical Fisher
  (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ for N = 3 examples: the gradient of example n is [Σ ĝ x̂, Σ ĝ] over its
  positions, which is what kfax sums per row (expand, exact with one row per example) or per
  example (reduce, exact for any loss on the examples, here pooled over sequences and images).
  This holds for BatchNorm in training mode too: x̂ couples examples through the batch
  statistics, but it does not depend on the BatchNorm's own scale and bias, and ℓ_n depends on
  them only through y_n = scale x̂_n + bias, so ∇ℓ_n is still [Σ ĝ_n x̂_n, Σ ĝ_n]. With several
  positions per example, expand sums per-position outer products instead: not exact. The update
  is (F_c + λ I)⁻¹ [g_scale_c, g_bias_c] per channel."""
  apply, params, t, layout = _norm_setup(name)
  per = _per_example(lambda p: _sq_terms(apply(p), t), params, layout)
  exact = _fisher(per)  # (C, k, k)
  loss_fn = lambda p: kfax.squared_error(apply(p), t)
  stats = _sequences(loss_fn, params)
  assert stats['reduce']['']['fisher'].shape == exact.shape
  _assert_rel(stats['reduce']['']['fisher'], exact, what='reduce')
  if NORMS[name][3]:
    _assert_rel(stats['expand']['']['fisher'], exact, what='expand')
  else:
    assert _rel_err(stats['expand']['']['fisher'], exact) > 1e-2
  stats, grads, updates, lam = _sequences(loss_fn, params, update=True)
  _assert_preconditioned(np.asarray(stats['expand']['']['fisher'], np.float64), layout(grads),
                         layout(updates), lam)


# ---------------------------------------------------------------------------------------------
# 2. K-FAC-expand and K-FAC-reduce, each exact in its regime (Eschenhagen et al., NeurIPS 2023).


class TokenMLP(nn.Module):
  """Dense -> tanh -> Dense on every position of (N, T, d): weights shared over positions."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='out')(jnp.tanh(nn.Dense(4, name='hidden')(x)))


def test_expand_is_exact_for_a_per_token_loss_on_identical_rows(x64):
  """K-FAC-expand (Eschenhagen et al., NeurIPS 2023) treats each of the M = N T positions as an
  example: A = (1/M) Σ a aᵀ, G = M Σ dy dyᵀ = (1/M) Σ ĝ ĝᵀ. The exact per-token Fisher is
  (1/M) Σ_m (a_m a_mᵀ) ⊗ (ĝ_m ĝ_mᵀ), equal to A ⊗ G whenever the a_m coincide. So: the same
  input at every position of both examples (then every layer's inputs coincide, tanh or not) and
  a different target per position (the ĝ_m differ). Both layers are exact; K-FAC-reduce, which
  sums the ĝ per example first, is not."""
  model = TokenMLP()
  x = jnp.broadcast_to(_normal(0, (1, 1, 2)), (2, 3, 2))
  t = _normal(1, (2, 3, 3))
  params = _params(model, x)
  apply = lambda p: model.apply({'params': p}, x)
  stats = _sequences(lambda p: kfax.squared_error(apply(p), t), params)
  for key in ('hidden', 'out'):
    layout = lambda g, key=key: _linear_block(g[key]['kernel'], g[key]['bias'])[None]
    exact = _fisher(_per_example(lambda p: _sq_terms(apply(p), t), params, layout))
    _assert_rel(_kron(stats['expand'][key]), exact, what=key)
    assert _rel_err(_kron(stats['reduce'][key]), exact) > 1e-2, key


def test_reduce_is_exact_for_a_pooled_loss_on_linear_weight_sharing(x64):
  """K-FAC-reduce (Eschenhagen et al., NeurIPS 2023): Dense -> Dense (linear) on (1, T, d), mean
  over T, then tanh -> Dense -> softmax cross-entropy. Both shared layers get the same output
  gradient at every position (the pooling is a mean and nothing nonlinear precedes it), so their
  gradient is Σ_t a_t ⊗ dy = ā ⊗ (T dy): one example's exact Fisher is ā āᵀ ⊗ s sᵀ, which reduce
  computes (A = ā āᵀ, G = N s sᵀ, N = 1) and expand does not."""

  class Pooled(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(4, name='first')(x)
      h = nn.Dense(3, name='second')(h).mean(1)
      return nn.Dense(5, name='head')(jnp.tanh(h))

  model = Pooled()
  x = _normal(0, (1, 4, 2))
  params = _params(model, x)
  stats = _sequences(
      lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), jnp.array([3])), params)
  terms = lambda p: -jax.nn.log_softmax(model.apply({'params': p}, x))[:, 3]
  for key in ('first', 'second', 'head'):
    layout = lambda g, key=key: _linear_block(g[key]['kernel'], g[key]['bias'])[None]
    exact = _fisher(_per_example(terms, params, layout))
    _assert_rel(_kron(stats['reduce'][key]), exact, what=key)
    if key != 'head':  # the head sees one row per example: both are exact there
      assert _rel_err(_kron(stats['expand'][key]), exact) > 1e-2, key


def test_dense_sequence_factors_follow_the_documented_formulas(x64):
  """With random rows (no exactness), the factors of a Dense on (N, T, d) are exactly the
  documented ones: expand A = (1/(N T)) Σ a aᵀ, G = M Σ dy dyᵀ; reduce A = (1/N) Σ_e ā ā ᵀ,
  G = M Σ_e s sᵀ, with M = N T = 6 the loss's examples and dy = dL/dy by `jax.grad`."""
  model = TokenMLP()
  x, t = _normal(0, (2, 3, 2)), _normal(1, (2, 3, 3))
  params = _params(model, x)
  stats = _sequences(lambda p: kfax.squared_error(model.apply({'params': p}, x), t), params)
  dense = lambda name, h: nn.Dense(params[name]['bias'].shape[0]).apply(
      {'params': params[name]}, h)
  h0 = dense('hidden', x)
  out_loss = lambda y: kfax.squared_error(y, t)
  inputs = {'hidden': x, 'out': jnp.tanh(h0)}
  dys = {'hidden': jax.grad(lambda h: out_loss(dense('out', jnp.tanh(h))))(h0),
         'out': jax.grad(out_loss)(dense('out', jnp.tanh(h0)))}
  for key in inputs:
    a = np.asarray(inputs[key])
    a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)
    dy = np.asarray(dys[key])
    for mode in ('expand', 'reduce'):
      ra, rg = a, dy
      if mode == 'reduce':
        ra, rg = a.mean(1, keepdims=True), dy.sum(1, keepdims=True)
      ref_a = np.einsum('eti,etj->ij', ra, ra) / (ra.shape[0] * ra.shape[1])
      ref_g = 6 * np.einsum('eti,etj->ij', rg, rg)
      _assert_rel(stats[mode][key]['a_factor'], ref_a, what=f'{mode} {key} A')
      _assert_rel(stats[mode][key]['g_factor'], ref_g, what=f'{mode} {key} G')


def test_reduce_examples_of_a_dense_general_with_leading_batch_dims(x64):
  """DenseGeneral(batch_dims=(0,)) as a per-head projection, heads first: x (H, N, T, d), a
  pooled loss over N = 3 examples. K-FAC-reduce (as documented: per example e, ā_e the mean of
  its rows, s_e the sum of its dy, A = (1/E) Σ ā ā ᵀ, G = N Σ s sᵀ) must average and sum over
  each example's T positions, per head block: the examples are the first axis the weights are
  shared over (x's axis 1), as for Dense, Conv and the norms (the first non-feature axis), not
  one example made of the whole batch."""
  heads, n, steps, f = 2, 3, 4, 3
  model = nn.DenseGeneral(f, axis=-1, batch_dims=(0,))
  x = _normal(0, (heads, n, steps, 2))
  t = _normal(1, (n, heads * f))
  params = _params(model, x)
  pool = lambda y: jnp.tanh(y.mean(2)).transpose(1, 0, 2).reshape(n, heads * f)
  loss_fn = lambda p: kfax.squared_error(pool(model.apply({'params': p}, x)), t)
  stats = _sequences(loss_fn, params)
  y = model.apply({'params': params}, x)
  dy = np.asarray(_jit(jax.grad(lambda y: kfax.squared_error(pool(y), t)))(y))  # (H, N, T, F)
  a = np.concatenate([np.asarray(x), np.ones((heads, n, steps, 1))], axis=-1)
  a_bar, s = a.mean(2), dy.sum(2)
  _assert_rel(stats['reduce']['']['a_factor'], np.einsum('hni,hnj->hij', a_bar, a_bar) / n,
              what='A')
  _assert_rel(stats['reduce']['']['g_factor'], n * np.einsum('hni,hnj->hij', s, s), what='G')


# ---------------------------------------------------------------------------------------------
# 3. Every flax.linen Module class is classified.


class Cell(nn.Module):
  """One step of a recurrent cell from its initial carry."""

  cell: nn.Module

  @nn.compact
  def __call__(self, x):
    carry = self.cell.initialize_carry(jax.random.key(0), x.shape)
    return self.cell(carry, x)[1]


class Subclassed(nn.Dense):
  """A Dense whose kernel is reparameterised by overriding `param`."""

  def param(self, name, init_fn, *args, **kwargs):
    return 2.0 * super().param(name, init_fn, *args, **kwargs)


_SEQ, _IMG, _ROW = (2, 3, 4), (2, 4, 4, 2), (2, 4)
_ATTENTION = lambda cls, **kw: (lambda: cls(num_heads=2, qkv_features=4, **kw), _SEQ,
                                'kronecker')
_DOT = lambda cls: (lambda: nn.Dense(3, dot_general_cls=cls), _SEQ, 'kronecker')

# Class name in flax.linen -> (module factory, input shape, expected curvature of every leaf, or
# {leaf prefix: curvature}). Input shape None: integer tokens.
CASES = {
    'Dense': (lambda: nn.Dense(3), _SEQ, 'kronecker'),
    'DenseGeneral': (lambda: nn.DenseGeneral((2, 3), axis=-1), _SEQ, 'kronecker'),
    'Einsum': (lambda: nn.Einsum((4, 3), 'nti,io->nto'), _SEQ, 'kronecker'),
    'Embed': (lambda: nn.Embed(7, 4), None, 'kronecker'),
    'Conv': (lambda: nn.Conv(3, (2, 2)), _IMG, 'kronecker'),
    'ConvTranspose': (lambda: nn.ConvTranspose(3, (2, 2), strides=(2, 2)), _IMG, 'kronecker'),
    'ConvLocal': (lambda: nn.ConvLocal(3, (2, 2)), _IMG, 'diagonal'),
    'BatchNorm': (lambda: nn.BatchNorm(use_running_average=False), _IMG, 'unitwise'),
    'LayerNorm': (lambda: nn.LayerNorm(), _SEQ, 'unitwise'),
    'GroupNorm': (lambda: nn.GroupNorm(num_groups=2), _IMG, 'unitwise'),
    'RMSNorm': (lambda: nn.RMSNorm(), _SEQ, 'unitwise'),
    'InstanceNorm': (lambda: nn.InstanceNorm(), _IMG, 'unitwise'),
    'WeightNorm': (lambda: nn.WeightNorm(nn.Dense(3)), _SEQ, 'diagonal'),
    'SpectralNorm': (lambda: nn.SpectralNorm(nn.Dense(3)), _SEQ, 'diagonal'),
    'MultiHeadDotProductAttention': _ATTENTION(nn.MultiHeadDotProductAttention),
    'MultiHeadAttention': _ATTENTION(nn.MultiHeadAttention),
    'SelfAttention': _ATTENTION(nn.SelfAttention),
    'LSTMCell': (lambda: Cell(nn.LSTMCell(5)), _ROW, 'kronecker'),
    # Its gates are DenseParams (raw parameters used with jnp.dot): no kind, the fallback.
    'OptimizedLSTMCell': (lambda: Cell(nn.OptimizedLSTMCell(5)), _ROW, 'diagonal'),
    'GRUCell': (lambda: Cell(nn.GRUCell(5)), _ROW, 'kronecker'),
    'MGUCell': (lambda: Cell(nn.MGUCell(5)), _ROW, 'kronecker'),
    'SimpleCell': (lambda: Cell(nn.SimpleCell(5)), _ROW, 'kronecker'),
    'ConvLSTMCell': (lambda: Cell(nn.ConvLSTMCell(3, (2, 2))), _IMG, 'kronecker'),
    'RNN': (lambda: nn.RNN(nn.GRUCell(3)), _SEQ, 'kronecker'),
    'Bidirectional': (lambda: nn.Bidirectional(nn.RNN(nn.GRUCell(3)), nn.RNN(nn.SimpleCell(3))),
                      _SEQ, 'kronecker'),
    'Sequential': (lambda: nn.Sequential([nn.Dense(4), nn.relu, nn.LayerNorm(), nn.PReLU()]),
                   _SEQ, {'layers_0': 'kronecker', 'layers_2': 'unitwise',
                          'layers_3': 'diagonal'}),
    'PReLU': (lambda: nn.PReLU(), _SEQ, 'diagonal'),
    # The fp8 ops own no 'params' (only `_overwrite_with_gradient` variables); the layers that
    # use them keep their kind.
    'Fp8DirectDotGeneralOp': _DOT(nn.Fp8DirectDotGeneralOp),
    'Fp8DotGeneral': _DOT(nn.Fp8DotGeneral),
    'Fp8DotGeneralOp': _DOT(nn.Fp8DotGeneralOp),
    'NANOOFp8DotGeneralOp': _DOT(nn.NANOOFp8DotGeneralOp),
    'Fp8Einsum': _ATTENTION(nn.MultiHeadDotProductAttention,
                            qk_attn_weights_einsum_cls=nn.Fp8Einsum,
                            attn_weights_value_einsum_cls=nn.Fp8Einsum),
}

# Classes without parameters of their own, and why.
NO_PARAMS = {
    'Module': 'the abstract base class',
    'RNNCellBase': 'the abstract base class of recurrent cells',
    'Dropout': 'has no parameters (checked below)',
}


def _module_classes():
  return sorted(name for name, value in vars(nn).items()
                if inspect.isclass(value) and issubclass(value, nn.Module))


def test_every_flax_linen_module_class_is_classified():
  """Introspection: every Module class in flax.linen has a case below (or is listed without
  parameters, with the reason), so a new Flax class fails here until it is classified."""
  classes = set(_module_classes())
  unclassified = classes - set(CASES) - set(NO_PARAMS)
  assert not unclassified, f'classify these flax.linen classes: {sorted(unclassified)}'
  assert not set(CASES) & set(NO_PARAMS)
  assert set(CASES) | set(NO_PARAMS) <= classes, sorted(set(CASES) | set(NO_PARAMS) - classes)
  variables = nn.Dropout(0.5, deterministic=True).init(jax.random.key(0), jnp.ones(_SEQ))
  assert 'params' not in variables


@contextlib.contextmanager
def _flax_deprecations():
  """Flax's own deprecation warnings of two classes the walk constructs on purpose."""
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', 'SelfAttention will be deprecated', DeprecationWarning)
    warnings.filterwarnings('ignore', 'The Fp8DotGeneralOp is deprecated', DeprecationWarning)
    yield


def _walk_setup():
  """Every case's model and variables, and one loss over all: the sum of a squared error on
  each case's output (the parameters of case `name` under `name/`)."""
  cases = {}
  for name, (make, shape, _) in CASES.items():
    x = jnp.array([[1, 2, 2], [6, 0, 1]]) if shape is None else _normal(0, shape, jnp.float32)
    cases[name] = (make(), x, {'update_stats': True} if name == 'SpectralNorm' else {})
  variables = {n: _init(m, x, **kw) for n, (m, x, kw) in cases.items()}
  params = {n: v['params'] for n, v in variables.items()}
  rest = {n: {k: c for k, c in v.items() if k != 'params'} for n, v in variables.items()}

  def loss_fn(p):
    total = 0.0
    for n, (model, x, kwargs) in cases.items():
      out = model.apply({'params': p[n], **rest[n]}, x, mutable=list(rest[n]) or False,
                        **kwargs)
      y = out[0] if rest[n] else out
      y = y.reshape(y.shape[0], -1)
      total = total + kfax.squared_error(y, jnp.ones_like(y))
    return total

  return params, loss_fn


def _expected(name, leaf):
  expect = CASES[name][2]
  if isinstance(expect, str):
    return expect
  (curvature,) = [c for prefix, c in expect.items() if leaf.startswith(f'{name}/{prefix}/')]
  return curvature


def test_every_parameter_is_captured_or_falls_back():
  """All cases at once (one trace, one compile): the table's entries partition the params leaves
  exactly (each leaf in exactly one entry: never both captured and fallback, never neither), each
  leaf of each class has its expected curvature (captured kinds kronecker / unitwise, everything
  else diagonal with a note saying why), `tx.init`'s state holds factors for exactly the entries
  with curvature, in their shapes (decompositions for exactly the Kronecker ones), and one real
  call's statistics have exactly the table's keys and shapes, and are finite."""
  with _flax_deprecations():
    params, loss_fn = _walk_setup()
    grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='empirical')
    table = grad_fn.layers(params)
    leaves = ['/'.join(k.key for k in path)
              for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert set(table.shapes) == set(leaves)
    covered = [leaf for e in table.entries.values() for leaf in e.leaves]
    assert sorted(covered) == sorted(leaves), 'entries must partition the parameters'
    wrong = []
    for e in table.entries.values():
      assert e.curvature in ('kronecker', 'unitwise', 'diagonal'), e
      if e.curvature == 'diagonal':
        assert e.note and e.leaves == (e.key,), e
      else:  # a layer: its own parameters, under its key
        assert all(leaf.rsplit('/', 1)[0] == e.key for leaf in e.leaves), e
      for leaf in e.leaves:
        name = leaf.split('/')[0]
        if e.curvature != _expected(name, leaf):
          wrong.append((leaf, e.curvature, e.note))
    assert not wrong, wrong
    for name in CASES:
      assert any(leaf.startswith(name + '/') for leaf in leaves), f'{name} has no parameters'
    state = jax.eval_shape(kfax.kfac(table).init, params)
    want = {k: e.stat_shapes() for k, e in table.entries.items()}
    assert {k: {n: f.shape for n, f in v.items()} for k, v in state.factors.items()} == want
    assert set(state.decompositions) == set(table.of('kronecker'))
    _, _, stats = _jit(grad_fn)(params)
    assert {k: {n: s.shape for n, s in v.items()} for k, v in stats.items()} == want
    assert all(np.isfinite(s).all() for s in jax.tree.leaves(stats))


# ---------------------------------------------------------------------------------------------
# 4. Transforms.


def _assert_trees_close(actual, expected, tol=1e-5):
  """Same structure, every leaf within `tol` of the largest entry of its expected leaf."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree.leaves(expected)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (path, a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(np.abs(b).max(), 1e-30),
                               err_msg=jax.tree_util.keystr(path))


def _ce_setup():
  """Six float32 examples of two features, labels of three classes."""
  return _normal(0, (6, 2), jnp.float32), jnp.arange(6) % 3


def _run(model, params, x, y, rng=jax.random.key(1), update=None, **options):
  """(table, loss, grads, stats, (updates, state)) of a cross-entropy loss on `model`, MC Fisher,
  and with `update` (kfax.kfac's options) one K-FAC update from a fresh state, in one compile."""
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn, **options)
  table = grad_fn.layers(params)
  tx = None if update is None else kfax.kfac(table, **update)

  def step(p, r):
    loss, grads, stats = grad_fn(p, rng=r)
    after = None if tx is None else tx.update(grads, tx.init(p), p, stats=stats)
    return loss, grads, stats, after

  return (table,) + _jit(step)(params, rng)


class Wrapped(nn.Module):
  """Dense -> tanh -> Dense, each Dense wrapped in a lifted transform (or not)."""

  how: str

  @nn.compact
  def __call__(self, x):
    wrap = {'plain': lambda c: c, 'remat': nn.remat, 'jit': nn.jit}[self.how]
    h = jnp.tanh(wrap(nn.Dense)(4, name='hidden')(x))
    return wrap(nn.Dense)(3, name='out')(h)


def test_remat_and_jit_give_the_plain_models_statistics():
  """nn.remat and nn.jit around each Dense: the same table, gradients and MC statistics (same
  key) as the unwrapped twin with the same parameters."""
  x, y = _ce_setup()
  params = _init(Wrapped('plain'), x)['params']
  table, _, grads, stats, _ = _run(Wrapped('plain'), params, x, y)
  assert set(table.of('kronecker')) == {'hidden', 'out'}
  for how in ('remat', 'jit'):
    table_, _, grads_, stats_, _ = _run(Wrapped(how), params, x, y)
    assert table_ == table, how
    _assert_trees_close(grads_, grads)
    _assert_trees_close(stats_, stats)


class Block(nn.Module):
  """A grouped 1-D conv, a LayerNorm and a Dense on (N, T, 4)."""

  @nn.compact
  def __call__(self, h, _=None):
    h = nn.LayerNorm()(nn.Conv(4, (2,), feature_group_count=2)(h))
    return jnp.tanh(nn.Dense(4)(h)), None


class Scanned(nn.Module):
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True},
                    length=self.layers)
    h, _ = stack(name='layers')(nn.Dense(4, name='embed')(x), None)
    return nn.Dense(3, name='head')(h.mean(1))


class Unrolled(nn.Module):
  layers: int = 3

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, name='embed')(x)
    for i in range(self.layers):
      h, _ = Block(name=f'layer{i}')(h)
    return nn.Dense(3, name='head')(h.mean(1))


def test_scan_over_layers_gives_per_layer_factors():
  """nn.scan over 3 blocks (grouped conv, LayerNorm, Dense): every statistic is stacked on a
  leading layer axis of 3 (before the conv's 2 group blocks), and slice i equals layer i's
  statistics in an unrolled twin with the same weights; so do the gradients."""
  x = _normal(0, (6, 5, 2), jnp.float32)
  y = jnp.arange(6) % 3
  params = _init(Scanned(), x)['params']
  twin = {'embed': params['embed'], 'head': params['head'],
          **{f'layer{i}': jax.tree.map(lambda p, i=i: p[i], params['layers']) for i in range(3)}}
  table, _, grads, stats, _ = _run(Scanned(), params, x, y)
  _, _, twin_grads, twin_stats, _ = _run(Unrolled(), twin, x, y)
  for name in ('Conv_0', 'LayerNorm_0', 'Dense_0'):
    assert table.entries[f'layers/{name}'].stack == (3,), name
  assert stats['layers/Conv_0']['a_factor'].shape == (3, 2, 5, 5)
  assert stats['layers/Conv_0']['g_factor'].shape == (3, 2, 2, 2)
  assert stats['layers/LayerNorm_0']['fisher'].shape == (3, 4, 2, 2)
  assert stats['layers/Dense_0']['a_factor'].shape == (3, 5, 5)
  for i in range(3):
    for name in ('Conv_0', 'LayerNorm_0', 'Dense_0'):
      _assert_trees_close(jax.tree.map(lambda s, i=i: s[i], stats[f'layers/{name}']),
                          twin_stats[f'layer{i}/{name}'])
    _assert_trees_close(jax.tree.map(lambda g, i=i: g[i], grads['layers']),
                        twin_grads[f'layer{i}'])
  for key in ('embed', 'head'):
    _assert_trees_close(stats[key], twin_stats[key])


def test_vmap_ensemble_gives_per_member_factors():
  """nn.vmap of a Dense over an ensemble axis of 3 (shared input): factors stacked (3, ...), and
  member k's equal those of the k-th of three separate Dense layers with its weights, under the
  same loss over all members' outputs."""

  class Ensemble(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = nn.vmap(nn.Dense, variable_axes={'params': 0}, split_rngs={'params': True},
                      in_axes=None, out_axes=0, axis_size=3)
      return dense(2, name='members')(x)

  class Separate(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.stack([nn.Dense(2, name=f'm{k}')(x) for k in range(3)])

  x = _normal(0, (5, 4), jnp.float32)
  t = _normal(1, (3, 5, 2), jnp.float32)
  params = _init(Ensemble(), x)['params']
  twin = {f'm{k}': jax.tree.map(lambda p, k=k: p[k], params['members']) for k in range(3)}
  run = lambda model, p: _stats(lambda q: kfax.squared_error(model.apply({'params': q}, x), t), p)
  _, grads, stats = run(Ensemble(), params)
  _, twin_grads, twin_stats = run(Separate(), twin)
  assert stats['members']['a_factor'].shape == (3, 5, 5)
  for k in range(3):
    _assert_trees_close(jax.tree.map(lambda s, k=k: s[k], stats['members']), twin_stats[f'm{k}'])
    _assert_trees_close(jax.tree.map(lambda g, k=k: g[k], grads['members']), twin_grads[f'm{k}'])


class UnrolledRNN(nn.Module):
  """nn.RNN(GRUCell) written as a Python loop over time calling one cell."""

  features: int = 3

  @nn.compact
  def __call__(self, x):
    cell = nn.GRUCell(self.features, param_dtype=x.dtype, name='cell')
    carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
    ys = []
    for t in range(x.shape[1]):
      carry, y = cell(carry, x[:, t])
      ys.append(y)
    return jnp.stack(ys, axis=1)


def _offset_calls(name, offsets):
  """An interceptor adding `offsets[i]` to the output of the i-th call of submodule `name`, so
  that the gradient w.r.t. the offsets is each call's output gradient."""
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.module.name == name and context.method_name == '__call__':
      y = y + offsets[len(calls)]
      calls.append(None)
    return y

  return interceptor


def test_rnn_shares_weights_over_time_a_adds_g_averages(x64):
  """nn.RNN(GRUCell) (an nn.scan inside) gives the statistics of the same cell unrolled in a
  Python loop, and those follow the weight-sharing rule: for the input gate 'ir' (input x_t at
  every step t of T = 4), A = Σ_t (1/N) Σ_n [x_t; 1][x_t; 1]ᵀ (adds over calls) and
  G = (1/T) Σ_t M Σ_n dy_t dy_tᵀ (averages over calls), dy_t its output gradient at step t
  (taken by offsetting its outputs), M = N T the loss's examples."""
  n, steps = 2, 4
  x, t = _normal(0, (n, steps, 2)), _normal(1, (n, steps, 3))
  rnn, unrolled = nn.RNN(nn.GRUCell(3, param_dtype=jnp.float64)), UnrolledRNN()
  params = _params(rnn, x)
  run = lambda model: _stats(lambda p: kfax.squared_error(model.apply({'params': p}, x), t),
                             params)
  _, grads, stats = run(rnn)
  _, twin_grads, twin_stats = run(unrolled)
  assert set(stats) == {f'cell/{g}' for g in ('ir', 'iz', 'in', 'hr', 'hz', 'hn')}
  _assert_trees_close(stats, twin_stats)
  _assert_trees_close(grads, twin_grads)

  def loss_of_offsets(offsets):
    with nn.intercept_methods(_offset_calls('ir', offsets)):
      return kfax.squared_error(unrolled.apply({'params': params}, x), t)

  dys = np.asarray(_jit(jax.grad(loss_of_offsets))(jnp.zeros((steps, n, 3))))
  a = np.concatenate([np.asarray(x), np.ones((n, steps, 1))], axis=-1)
  ref_a = np.einsum('nti,ntj->ij', a, a) / n
  ref_g = np.einsum('tni,tnj->ij', dys, dys) * (n * steps) / steps
  _assert_rel(stats['cell/ir']['a_factor'], ref_a, what='A')
  _assert_rel(stats['cell/ir']['g_factor'], ref_g, what='G')


class Boxed(nn.Module):
  how: str

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    kernel = {'plain': init,
              'partitioning': nn.with_partitioning(init, (None, 'model')),
              'logical': nn.with_logical_partitioning(init, ('embed', 'mlp'))}[self.how]
    h = jnp.tanh(nn.Dense(4, kernel_init=kernel, name='hidden')(x))
    return nn.Dense(3, kernel_init=kernel, name='out')(nn.LayerNorm(name='norm')(h))


def test_boxed_params_give_the_unboxed_twins_statistics_and_update():
  """Kernels boxed by nn.with_partitioning / nn.with_logical_partitioning: the same table,
  statistics and (unboxed) K-FAC update as the plain twin with the unboxed values."""
  x, y = _ce_setup()
  is_box = lambda v: isinstance(v, nn.meta.AxisMetadata)
  run = lambda how, params: _run(Boxed(how), params, x, y, update={})
  boxed = {how: _init(Boxed(how), x)['params'] for how in ('partitioning', 'logical')}
  plain = nn.meta.unbox(boxed['logical'])
  t1, _, g1, s1, (u1, _) = run('plain', plain)
  for how, params in boxed.items():
    assert sum(map(is_box, jax.tree.leaves(params, is_leaf=is_box))) == 2
    _assert_trees_close(nn.meta.unbox(params), plain, 0)
    t0, _, g0, s0, (u0, _) = run(how, params)
    g0, u0 = nn.meta.unbox(g0), nn.meta.unbox(u0)
    assert t0 == t1, how
    assert set(t0.of('kronecker')) == {'hidden', 'out'} and set(t0.of('unitwise')) == {'norm'}
    _assert_trees_close(s0, s1)
    _assert_trees_close(g0, g1)
    _assert_trees_close(u0, u1)


def test_reparameterised_kernels_fall_back_with_a_note():
  """WeightNorm(Dense), SpectralNorm(Dense) and a Dense subclass overriding `param`: their
  kernels are not the parameters stored, so every such parameter gets the diagonal fallback and
  kfax.summary says why; the plain Dense next to them stays Kronecker."""

  class Reparam(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.WeightNorm(nn.Dense(4, name='wn'))(x)
      h = nn.SpectralNorm(nn.Dense(4, name='sn'))(jnp.tanh(h), update_stats=True)
      h = Subclassed(4, name='sub')(jnp.tanh(h))
      return nn.Dense(3, name='plain')(jnp.tanh(h))

  model = Reparam()
  x, y = _ce_setup()
  variables = _init(model, x)
  params, rest = variables['params'], {'batch_stats': variables['batch_stats']}
  loss_fn = lambda p: kfax.softmax_cross_entropy(
      model.apply({'params': p, **rest}, x, mutable=['batch_stats'])[0], y)
  table = kfax.value_grad_and_stats(loss_fn).layers(params)
  lines = {line.split()[0]: line for line in kfax.summary(table).splitlines()[1:-1]}
  assert set(lines) == set(table.shapes)
  for leaf in table.shapes:
    (entry,) = [e for e in table.entries.values() if leaf in e.leaves]
    if leaf.startswith('plain/'):
      assert entry.curvature == 'kronecker'
    else:
      assert entry.curvature == 'diagonal' and 'diagonal fallback' in lines[leaf], lines[leaf]
  assert 'inside WeightNorm (a reparameterised kernel)' in lines['wn/kernel']
  assert 'inside SpectralNorm (a reparameterised kernel)' in lines['sn/kernel']
  assert 'Subclassed overrides `param`' in lines['sub/kernel']


# ---------------------------------------------------------------------------------------------
# 5. The contract.


def _mlp_setup():
  model = Wrapped('plain')
  x, y = _ce_setup()
  params = _init(model, x)['params']
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  return model, params, x, y, loss_fn


def test_update_requires_stats():
  """tx.update without `stats=` is a TypeError; a misspelled `stat=` is named in it; an explicit
  stats=None preconditions without statistics (none yet: the gradients pass through)."""
  model, params, x, y, _ = _mlp_setup()
  table, _, grads, stats, _ = _run(model, params, x, y)
  tx = kfax.kfac(table)
  state = tx.init(params)
  with pytest.raises(TypeError, match='kfax.kfac: update needs the statistics'):
    tx.update(grads, state, params)
  with pytest.raises(TypeError, match='`stat=`'):
    tx.update(grads, state, params, stat=stats)
  updates, _ = _jit(lambda g, s: tx.update(g, s, params, stats=None))(grads, state)
  _assert_trees_close(updates, grads)


def test_has_aux_mismatches_raise_kfax_errors():
  """has_aux=True with a scalar loss, and has_aux=False with a tuple, are kfax's ValueErrors."""
  model, params, x, _, loss_fn = _mlp_setup()
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r'kfax.value_grad_and_stats: has_aux=True'):
    kfax.value_grad_and_stats(loss_fn, has_aux=True)(params, rng=key)
  with_aux = lambda p: (loss_fn(p), {'logits': model.apply({'params': p}, x)})
  with pytest.raises(ValueError, match=r'kfax.value_grad_and_stats: .*pass has_aux=True'):
    kfax.value_grad_and_stats(with_aux)(params, rng=key)
  with pytest.raises(ValueError, match=r'kfax.value_grad_and_stats: .*pass has_aux=True'):
    kfax.value_grad_and_stats(with_aux).layers(params)


def test_stats_in_the_wrong_form_raise_kfax_errors():
  """The whole (loss, grads, stats) output, or statistics of another table, are kfax's errors."""
  model, params, x, y, _ = _mlp_setup()
  table, loss, grads, stats, _ = _run(model, params, x, y)
  tx = kfax.kfac(table)
  state = tx.init(params)
  with pytest.raises(TypeError, match=r'kfax.kfac: `stats` must be the dict'):
    tx.update(grads, state, params, stats=(loss, grads, stats))
  partial = {k: v for k, v in stats.items() if k != 'out'}
  with pytest.raises(ValueError, match=r"kfax.kfac: `stats` do not match .*missing \['out'\]"):
    tx.update(grads, state, params, stats=partial)


def test_loss_with_its_own_rng_receives_the_users_key():
  """A loss_fn taking `rng` (dropout) gets the key the user passed: the loss and gradients equal
  calling it directly with that key, and (the same dropout mask) the A factors of fisher='mc'
  equal those of fisher='empirical', while the MC G (sampled targets, a key folded from rng)
  differs from the empirical one."""

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dropout(0.5, deterministic=False)(jnp.tanh(nn.Dense(8, name='hidden')(x)))
      return nn.Dense(3, name='out')(h)

  model = Drop()
  x, y = _ce_setup()
  params = _init(model, x)['params']

  def loss_fn(p, x, y, rng):
    return kfax.softmax_cross_entropy(model.apply({'params': p}, x, rngs={'dropout': rng}), y)

  key = jax.random.key(5)
  fns = {f: kfax.value_grad_and_stats(loss_fn, fisher=f) for f in ('mc', 'empirical')}
  out, (ref_loss, ref_grads), other = _jit(lambda p, k: (
      {f: fn(p, x, y, rng=k) for f, fn in fns.items()},
      jax.value_and_grad(loss_fn)(p, x, y, rng=k),
      loss_fn(p, x, y, rng=jax.random.fold_in(k, 1))))(params, key)
  assert not np.isclose(float(other), float(ref_loss))  # the key matters
  loss, grads, mc = out['mc']
  _assert_rel(loss, ref_loss, 1e-6)
  _assert_trees_close(grads, ref_grads)
  emp = out['empirical'][2]
  _assert_rel(mc['out']['a_factor'], emp['out']['a_factor'], 1e-6)
  assert all(np.isfinite(s).all() for s in jax.tree.leaves(mc))
  assert _rel_err(mc['out']['g_factor'], emp['out']['g_factor']) > 1e-3


def test_inf_in_one_layers_gradient_leaves_the_others_updates_finite():
  """An Inf in one layer's gradient, that layer having good statistics (so it is preconditioned
  and its vᵀg is Inf), leaves every other layer's update finite and exactly what it is when that
  layer's gradient is zero: the norm constraint skips the non-finite term. Inf statistics for
  that layer instead are skipped and counted, the others' absorbed."""
  model, params, x, y, _ = _mlp_setup()
  table, _, grads, stats, _ = _run(model, params, x, y)
  bad = {**grads, 'out': {**grads['out'],
                          'kernel': grads['out']['kernel'].at[0, 0].set(jnp.inf)}}
  zero = {**grads, 'out': jax.tree.map(jnp.zeros_like, grads['out'])}
  bad_stats = {**stats, 'out': {n: v.at[(0,) * v.ndim].set(jnp.inf)
                                for n, v in stats['out'].items()}}
  tx = optax.chain(kfax.kfac(table, norm_constraint=1e-6), optax.sgd(0.1))
  step = _jit(lambda g, s: tx.update(g, tx.init(params), params, stats=s))
  updates, state = step(bad, stats)
  reference, _ = step(zero, stats)
  unconstrained, _ = _jit(lambda g, s: kfax.kfac(table, norm_constraint=None).update(
      g, kfax.kfac(table).init(params), params, stats=s))(zero, stats)
  assert int(state[0].skipped_stats) == 0 and int(state[0].stats_count['out']) == 1
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates['hidden']))
  _assert_trees_close(updates['hidden'], reference['hidden'], 1e-6)
  assert not np.allclose(-0.1 * np.asarray(unconstrained['hidden']['kernel']),
                         updates['hidden']['kernel'])  # the constraint is active
  updates, state = step(grads, bad_stats)
  assert int(state[0].skipped_stats) == 1
  assert int(state[0].stats_count['out']) == 0 and int(state[0].stats_count['hidden']) == 1
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_summary_lists_every_parameter_with_its_rule():
  """kfax.summary has one line per parameter (by path, with its shape) and its rule: Kronecker
  factors with their sizes, the unit-wise blocks, the Embed's diagonal token side, and the
  fallback with the reason."""

  class Mixed(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      h = nn.Embed(7, 4, name='embed')(tokens)  # (2, 3, 4)
      h = nn.Conv(5, (2,), name='conv')(h)
      h = nn.LayerNorm(name='norm')(h)
      h = nn.PReLU(name='prelu')(h)
      return nn.Dense(3, name='dense')(h.mean(1))

  model = Mixed()
  tokens = jnp.array([[1, 2, 3], [4, 5, 6]])
  params = _init(model, tokens)['params']
  loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, tokens),
                                                 jnp.array([0, 1]))
  table = kfax.value_grad_and_stats(loss_fn).layers(params)
  text = kfax.summary(table)
  rows = {}
  for line in text.splitlines()[1:-1]:
    path = line.split()[0]
    assert path not in rows, f'{path} listed twice'
    rows[path] = line
  assert set(rows) == set(table.shapes)
  for path, shape in table.shapes.items():
    assert str(shape) in rows[path], rows[path]
  expected = {
      'embed/embedding': r'embed: A 7 diag ⊗ G 4x4',
      'conv/kernel': r'conv: A 9x9 ⊗ G 5x5',
      'norm/scale': r'norm: unit-wise 2x2 per channel \(5\)',
      'prelu/negative_slope': r'diagonal fallback +\[PReLU: not a layer kind kfax captures\]',
      'dense/kernel': r'dense: A 6x6 ⊗ G 3x3',
  }
  for path, rule in expected.items():
    assert re.search(rule, rows[path]), rows[path]
  assert text.splitlines()[-1].startswith('total: parameters')


def test_where_masked_positions_do_not_enter_the_mc_g():
  """softmax_cross_entropy(where=...) with the last two of six examples masked: the MC G of
  every layer equals that of the model run on the four kept examples only (N = 4, the kept
  count, in both; the masked examples get a zero cotangent). Partitionable threefry draws per
  element index, so the kept examples' sampled labels are the same in both runs."""
  model, params, x, y, _ = _mlp_setup()
  where = jnp.arange(6) < 4
  masked = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y, where=where)
  kept = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x[:4]), y[:4])
  fns = [kfax.value_grad_and_stats(f) for f in (masked, kept)]
  with jax.threefry_partitionable(True):
    (loss, grads, stats), (ref_loss, ref_grads, ref_stats) = _jit(
        lambda p, k: [f(p, rng=k) for f in fns])(params, jax.random.key(3))
  _assert_rel(loss, ref_loss, 1e-6)
  _assert_trees_close(grads, ref_grads)
  for key in ('hidden', 'out'):
    _assert_rel(stats[key]['g_factor'], ref_stats[key]['g_factor'], 1e-5, key)


def test_fallback_none_passes_gradients_through():
  """fallback='none': a parameter no kind captures (PReLU's slope) has curvature 'none', no
  statistics and no state, and its update is its gradient, bit for bit."""

  class WithSlope(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='out')(nn.PReLU(name='prelu')(nn.Dense(4, name='hidden')(x)))

  model = WithSlope()
  x, y = _ce_setup()
  params = _init(model, x)['params']
  table, _, grads, stats, (updates, _) = _run(model, params, x, y, update={}, fallback='none')
  assert table.entries['prelu/negative_slope'].curvature == 'none'
  assert set(stats) == {'hidden', 'out'}
  assert set(jax.eval_shape(kfax.kfac(table).init, params).factors) == {'hidden', 'out'}
  np.testing.assert_array_equal(updates['prelu']['negative_slope'],
                                grads['prelu']['negative_slope'])
  assert not np.allclose(updates['hidden']['kernel'], grads['hidden']['kernel'])


def test_max_factor_dim_keeps_a_larger_side_diagonal():
  """max_factor_dim=3: a Dense 2 -> 5 keeps its A side (3 with the bias) dense and its G side of
  5 diagonal, shape (5,), equal to the diagonal of the dense G; the state follows, and the
  update is (A ⊗ diag(G) + λ I)⁻¹ g."""
  model = nn.Dense(5)
  x, y = _ce_setup()
  params = _init(model, x)['params']
  table, _, grads, stats, (updates, state) = _run(
      model, params, x, y, max_factor_dim=3,
      update={'damping_mode': 'eigen', 'damping': 1e-2, 'norm_constraint': None})
  _, _, _, full, _ = _run(model, params, x, y)
  assert table.entries[''].diag == (False, True)
  assert stats['']['a_factor'].shape == (3, 3) and stats['']['g_factor'].shape == (5,)
  _assert_rel(stats['']['g_factor'], np.diag(np.asarray(full['']['g_factor'])), 1e-6)
  _assert_rel(stats['']['a_factor'], full['']['a_factor'], 1e-6)
  assert state.factors['']['g_factor'].shape == (5,)
  assert state.decompositions['']['g_eigvals'].shape == (5,)
  assert 'g_eigvecs' not in state.decompositions['']
  curvature = np.kron(np.asarray(stats['']['a_factor'], np.float64),
                      np.diag(np.asarray(stats['']['g_factor'], np.float64)))
  _assert_preconditioned(curvature[None], _linear_block(grads['kernel'], grads['bias']),
                         _linear_block(updates['kernel'], updates['bias']), 1e-2)


def test_an_nnx_state_without_its_module_raises_instead_of_falling_back_silently():
  """Capture needs an NNX model's module to see its layers: its state alone would give every
  parameter the fallback."""
  from flax import nnx

  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  x, y = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
  loss_fn = lambda p: kfax.softmax_cross_entropy(nnx.merge(graphdef, p)(x), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn)
  with pytest.raises(TypeError, match='flax.nnx variables.*pass the nnx.Module itself'):
    grad_fn.layers(params)
  with pytest.raises(TypeError, match='flax.nnx variables'):
    grad_fn(params, rng=jax.random.key(0))


def test_a_subclass_redefining_call_is_captured_at_the_layers_own_call(x64):
  """`__call__` overridden around `super().__call__` (Gemma's scaled embedding): the statistics
  are those of the layer's own call, as if the scaling were outside it, for linen and NNX."""
  from flax import nnx

  class Scaled(nn.Dense):
    def __call__(self, x):
      return super().__call__(x) * 3.0

  class Twice(Scaled):  # two levels of overrides
    def __call__(self, x):
      return super().__call__(x) + 0.0

  class Outside(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name='layer')(x) * 3.0

  class NnxScaled(nnx.Linear):
    def __call__(self, x):
      return super().__call__(x) * 3.0

  x = jax.random.normal(jax.random.key(0), (6, 3))
  y = jax.random.randint(jax.random.key(1), (6,), 0, 4)
  stats = lambda module, p: kfax.value_grad_and_stats(
      lambda p, x, y: kfax.softmax_cross_entropy(module.apply({'params': p}, x), y),
      fisher='empirical')(p, x, y)[2]
  params = Outside().init(jax.random.key(2), x)['params']
  expected = stats(Outside(), params)['layer']
  for module in (Scaled(4), Twice(4)):
    got = stats(module, params['layer'])['']
    jax.tree.map(np.testing.assert_allclose, got, expected)
  model = NnxScaled(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  model.kernel.set_value(params['layer']['kernel'])
  model.bias.set_value(params['layer']['bias'])
  got = kfax.value_grad_and_stats(lambda m, x, y: kfax.softmax_cross_entropy(m(x), y),
                                  fisher='empirical')(model, x, y)[2]['']
  jax.tree.map(np.testing.assert_allclose, got, expected)


def test_importing_kfax_with_an_older_flax_raises_a_clear_error():
  import subprocess
  import sys

  code = 'import flax; flax.__version__ = "0.12.5"; import kfax'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert out.returncode != 0 and 'kfax needs flax >= 0.12.6, found 0.12.5' in out.stderr
