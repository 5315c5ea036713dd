"""`kfax.kfac`: K-FAC preconditioning as an optax gradient transformation."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfax import _distributed, _inverse
from kfax._capture import Stats
from kfax._params import LayerSlots, find_layers, gradient_matrix, set_gradient_matrix

DAMPING_MODES = ('eigen', 'factored')


class KfacState(NamedTuple):
  """K-FAC state: every per-layer field is a dict keyed by the layer's path ('Dense_0', ...)."""

  count: jax.Array  # shape=(), int32: updates so far.
  stats_count: dict[str, jax.Array]  # shape=(), int32: statistics each layer has absorbed.
  a_factor: dict[str, jax.Array]  # (d_in, d_in) float32, EMA of A (bias coordinate last).
  g_factor: dict[str, jax.Array]  # (d_out, d_out) float32, EMA of G.
  a_eigvals: dict[str, jax.Array]  # (d_in,) float32, "eigen" mode only.
  a_eigvecs: dict[str, jax.Array]  # (d_in, d_in) float32, "eigen" mode only.
  g_eigvals: dict[str, jax.Array]  # (d_out,) float32, "eigen" mode only.
  g_eigvecs: dict[str, jax.Array]  # (d_out, d_out) float32, "eigen" mode only.
  a_inverse: dict[str, jax.Array]  # (d_in, d_in) float32, damped, "factored" mode only.
  g_inverse: dict[str, jax.Array]  # (d_out, d_out) float32, damped, "factored" mode only.
  skipped_stats: jax.Array  # shape=(), int32: steps whose non-finite stats were ignored.
  failed_refreshes: jax.Array  # shape=(), int32: refreshes that kept a last good decomposition.


def _check(name: str, value: Any, ok: Callable[[Any], bool], fix: str) -> None:
  """Raises for a bad concrete number; schedules and traced values (inject_hyperparams) pass."""
  if isinstance(value, numbers.Number) and not ok(value):
    raise ValueError(f'kfax.kfac: `{name}` {fix}, got {value!r}.')


def _at(value: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return jnp.asarray(value(count) if callable(value) else value, jnp.float32)


def kfac(
    damping: optax.ScalarOrSchedule = 1e-4,
    ema_decay: optax.ScalarOrSchedule = 0.95,
    inverse_every: int = 10,
    damping_mode: str = 'factored',
    norm_constraint: float | None = 1e-3,
    axis_name: str | tuple[str, ...] | None = None,
    comm_dtype: str = 'float32',
) -> optax.GradientTransformationExtraArgs:
  """Precondition gradients with the damped Kronecker-factored Fisher (K-FAC).

  For each layer with input statistics `A = E[a aᵀ]` and output-gradient statistics
  `G = E[g gᵀ]` (from `kfax.value_grad_and_stats`), the gradient matrix `X` (kernel rows, then
  the bias row) becomes, with `damping_mode="eigen"`, `(A ⊗ G + λ I)⁻¹ vec(X)`, and with
  `damping_mode="factored"`, `(A + π√λ I)⁻¹ X (G + √λ/π I)⁻¹`. Chain it with optax for the
  learning rate, momentum and weight decay:
  `optax.chain(kfax.kfac(), optax.sgd(learning_rate, momentum=0.9))`.

  Statistics arrive as the `stats=` extra argument; pass `stats=None` on steps that computed none,
  which then only precondition. Factors are exponential moving averages whose first statistics
  replace the identity they start from. Their eigendecompositions (or damped inverses) refresh
  every `inverse_every` updates and on the first statistics, inside the compiled step
  (`lax.cond`). A layer passes its gradient through unchanged until it has statistics, and so
  do parameters outside any Dense/Conv kernel (see `kfax.summary`). Non-finite statistics leave
  the factors unchanged and a non-finite decomposition keeps the last good one; both are counted
  in the state (`skipped_stats`, `failed_refreshes`). Factors and decompositions are float32
  whatever the parameter dtype; updates keep the gradients' dtype.

  Args:
    damping: λ > 0, a float or an optax schedule of the update count. Note that at equal λ exact
      ("eigen") damping is far weaker than π-factored damping (√λ on each factor).
    ema_decay: weight of the old factor in the moving average, in [0, 1], or a schedule;
      0 keeps only the latest batch.
    inverse_every: updates between refreshes of the eigendecompositions / inverses (>= 1).
    damping_mode: `"eigen"` (exact damping of the Kronecker product; applies the current λ every
      step) or `"factored"` (π-corrected Tikhonov damping of each factor, as in chainerkfac and
      Martens & Grosse 2015; λ is frozen into the inverses at each refresh).
    norm_constraint: if not None, scales the preconditioned layers' updates by
      `min(1, sqrt(c / vᵀg))`, where `vᵀg` is the squared Fisher norm of their preconditioned
      gradient `v` (Ba et al., 2017, §5). It does not see the learning rate: the KL of a step is
      about `learning_rate**2 * c`.
    axis_name: the device axis of `jax.pmap` / `jax.shard_map` to average statistics over and to
      split refreshes across; None under plain `jit` (also with a batch-sharded input: XLA's
      partitioner then computes the global statistics itself). Gradients are the caller's to
      average, as with any optax transformation.
    comm_dtype: dtype name of the statistics all-reduce: 'float32', or 'bfloat16' to halve its
      bytes (a name, not `jnp.bfloat16`, so that `optax.inject_hyperparams` leaves it static).

  The defaults are those with which a first, untuned try converged fastest on the digits MLP and
  CNN (`examples/digits.py`; SGD momentum 0.9, lr 0.1, statistics every 5 steps): 52 and 40 steps
  to 97% test accuracy (5 seeds), against 102 and 72 for Adam at its best learning rate, and
  convergence at every learning rate tried (0.03 to 0.3). Without the norm constraint every
  λ <= 0.1 diverged at lr >= 0.1 in both modes; with it, "factored" λ=1e-4 beat λ=1e-3 and 1e-5,
  and "eigen" λ=1e-3 (60 and 60 steps) at about twice the cost per step.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose `update(updates, state, params=None, *,
    stats=None)` returns the preconditioned gradients.

  References:
    Martens & Grosse, *Optimizing Neural Networks with Kronecker-factored Approximate Curvature*,
    ICML 2015. Grosse & Martens, *A Kronecker-factored approximate Fisher matrix for convolution
    layers*, ICML 2016. Osawa et al., *Large-Scale Distributed Second-Order Optimization Using
    Kronecker-Factored Approximate Curvature for Deep Convolutional Neural Networks*, CVPR 2019.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax, kfax
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((8, 4)), jnp.zeros(8, jnp.int32)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> loss_fn = lambda p: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
    >>> loss, grads, stats = kfax.value_grad_and_stats(loss_fn)(params)
    >>> tx = optax.chain(kfax.kfac(damping=1e-3), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params, stats=stats)
    >>> jax.tree.map(jnp.shape, updates)
    {'bias': (3,), 'kernel': (4, 3)}
  """
  _check('damping', damping, lambda v: v > 0,
         'must be > 0; pass a positive float or an optax schedule')
  _check('ema_decay', ema_decay, lambda v: 0 <= v <= 1,
         'must be in [0, 1] (the weight on the old factor)')
  _check('inverse_every', inverse_every, lambda v: v == int(v) >= 1,
         'must be an integer >= 1 (updates between refreshes)')
  _check('norm_constraint', norm_constraint, lambda v: v > 0, 'must be > 0, or None for no bound')
  if damping_mode not in DAMPING_MODES:
    raise ValueError(
        f'kfax.kfac: `damping_mode` must be one of {DAMPING_MODES}, got {damping_mode!r}.'
    )
  comm_dtype = jnp.dtype(comm_dtype)
  if comm_dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(
        f'kfax.kfac: `comm_dtype` must be float32, bfloat16 or float16, got {comm_dtype}.')
  eigen = damping_mode == 'eigen'

  def init_fn(params: optax.Params) -> KfacState:
    layers = find_layers(params)
    eye = lambda d: jnp.eye(d, dtype=jnp.float32)
    ones = lambda d: jnp.ones((d,), jnp.float32)
    a_dims = {k: s.dims[0] for k, s in layers.items()}
    g_dims = {k: s.dims[1] for k, s in layers.items()}
    each = lambda fn, dims: {k: fn(d) for k, d in dims.items()}
    zero = lambda: jnp.zeros((), jnp.int32)  # one buffer per leaf, so the state can be donated
    return KfacState(
        count=zero(),
        stats_count={k: zero() for k in layers},
        a_factor=each(eye, a_dims),
        g_factor=each(eye, g_dims),
        a_eigvals=each(ones, a_dims) if eigen else {},
        a_eigvecs=each(eye, a_dims) if eigen else {},
        g_eigvals=each(ones, g_dims) if eigen else {},
        g_eigvecs=each(eye, g_dims) if eigen else {},
        a_inverse={} if eigen else each(eye, a_dims),
        g_inverse={} if eigen else each(eye, g_dims),
        skipped_stats=zero(),
        failed_refreshes=zero(),
    )

  def absorb(state: KfacState, stats: Stats) -> KfacState:
    """EMA of the factors with this batch's statistics, unless they are non-finite."""
    decay = _at(ema_decay, state.count)
    finite = _inverse.all_finite(stats)
    a_factor, g_factor, stats_count = dict(state.a_factor), dict(state.g_factor), dict(
        state.stats_count)
    for key, new in stats.items():
      w = jnp.where(state.stats_count[key] > 0, decay, 0.0)  # first statistics replace
      for factors, name in ((a_factor, 'a_factor'), (g_factor, 'g_factor')):
        old = factors[key]
        ema = w * old + (1 - w) * new[name].astype(old.dtype)
        factors[key] = jnp.where(finite, ema, old).astype(old.dtype)
      stats_count[key] = stats_count[key] + finite.astype(jnp.int32)
    return state._replace(
        a_factor=a_factor, g_factor=g_factor, stats_count=stats_count,
        skipped_stats=state.skipped_stats + (~finite).astype(jnp.int32))

  def refresh(state: KfacState, damping_now: jax.Array) -> KfacState:
    """New decompositions; a layer whose result is non-finite keeps its last good one."""
    work = {}
    for key, a in state.a_factor.items():
      g = state.g_factor[key]
      work[('a', key)], work[('g', key)] = (
          (a, g) if eigen else _inverse.factored_damping(a, g, damping_now))
    decompose = _inverse.eigendecompose if eigen else _inverse.invert
    if axis_name is None:
      done = decompose(work)
    else:
      done = _distributed.split_work(decompose, work, axis_name)
    names = (('eigvals', 'eigvecs') if eigen else ('inverse',))
    failed = jnp.array(False)
    new = {f'{side}_{name}': {} for side in 'ag' for name in names}
    for key in state.a_factor:
      ok = _inverse.all_finite([done[('a', key)], done[('g', key)]])
      failed = failed | ~ok
      for side in 'ag':
        for name, value in zip(names, done[(side, key)]):
          field = f'{side}_{name}'
          new[field][key] = jnp.where(ok, value, getattr(state, field)[key])
    return state._replace(**new, failed_refreshes=state.failed_refreshes + failed.astype(jnp.int32))

  def precondition(x: jax.Array, key: str, state: KfacState, damping_now: jax.Array) -> jax.Array:
    if eigen:
      return _inverse.precondition_eigen(
          x, state.a_eigvecs[key], state.a_eigvals[key], state.g_eigvecs[key],
          state.g_eigvals[key], damping_now)
    return _inverse.precondition_factored(x, state.a_inverse[key], state.g_inverse[key])

  def update_fn(
      updates: optax.Updates,
      state: KfacState,
      params: optax.Params | None = None,
      *,
      stats: Stats | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, KfacState]:
    del params, extra_args
    layers = find_layers(updates)
    _check_layers(layers, state)
    damping_now = _at(damping, state.count)
    first_stats = jnp.array(False)
    if stats is not None:
      _check_stats(stats, state)
      if axis_name is not None:
        with jax.named_scope('kfax/all_reduce_stats'):
          stats = _distributed.mean_statistics(stats, axis_name, comm_dtype)
      with jax.named_scope('kfax/factors'):
        before = state.stats_count
        state = absorb(state, stats)
        first_stats = jnp.any(jnp.stack(
            [(before[k] == 0) & (state.stats_count[k] > 0) for k in stats]))
    with jax.named_scope('kfax/refresh'):
      due = (state.count % inverse_every == 0) | first_stats
      state = jax.lax.cond(due, refresh, lambda s, _: s, state, damping_now)
    leaves, treedef = jax.tree.flatten(updates)
    out = list(leaves)
    inner = jnp.zeros((), jnp.float32)
    with jax.named_scope('kfax/precondition'):
      vs = {}
      for key, slots in layers.items():
        x = gradient_matrix(leaves, slots)
        ready = state.stats_count[key] > 0
        vs[key] = jnp.where(ready, precondition(x, key, state, damping_now), x)
        if norm_constraint is not None:
          inner = inner + jnp.where(ready, jnp.vdot(vs[key], x), 0.0)
    if norm_constraint is not None:
      scale = jnp.minimum(1.0, jnp.sqrt(norm_constraint / jnp.maximum(inner, 1e-30)))
      vs = {k: jnp.where(state.stats_count[k] > 0, v * scale, v) for k, v in vs.items()}
    for key, slots in layers.items():
      set_gradient_matrix(out, slots, vs[key])
    state = state._replace(count=optax.safe_increment(state.count))
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_layers(layers: dict[str, LayerSlots], state: KfacState) -> None:
  for key, slots in layers.items():
    if key not in state.a_factor:
      raise ValueError(
          f'kfax.kfac: the updates have a layer {key!r} that the state does not; init and update'
          ' must see trees of the same structure.')
    if (state.a_factor[key].shape[0], state.g_factor[key].shape[0]) != slots.dims:
      raise ValueError(
          f'kfax.kfac: layer {key!r} has kernel shape {slots.kernel_shape}, which does not match'
          f' the factors in the state {state.a_factor[key].shape}, {state.g_factor[key].shape};'
          ' init the optimizer with the params you update.')
  missing = sorted(set(state.a_factor) - set(layers))
  if missing:
    raise ValueError(f'kfax.kfac: the updates lack the layers {missing} that init saw.')


def _check_stats(stats: Stats, state: KfacState) -> None:
  unknown = sorted(set(stats) - set(state.a_factor))
  if unknown:
    raise ValueError(
        f'kfax.kfac: statistics for {unknown}, which are not kernels of the params given to'
        f' init (layers: {sorted(state.a_factor)}); pass the same params tree to the loss and'
        ' to init.')
  for key, new in stats.items():
    want = (state.a_factor[key].shape, state.g_factor[key].shape)
    got = (jnp.shape(new['a_factor']), jnp.shape(new['g_factor']))
    if want != got:
      raise ValueError(
          f'kfax.kfac: layer {key!r}: capture saw factors of shapes A {got[0]}, G {got[1]} but'
          f' its kernel (and bias) needs A {want[0]}, G {want[1]}; the module at {key!r} does not'
          ' use the kernel stored there as a Dense/Conv kernel.')
  missing = sorted(set(state.a_factor) - set(stats))
  if missing:
    warnings.warn(
        f'kfax.kfac: no statistics for {missing} (not called as nn.Dense / nn.Conv in the loss,'
        ' or unsupported); their gradients pass through unchanged. Route them elsewhere with'
        ' optax.partition to save their factor state.', stacklevel=3)
