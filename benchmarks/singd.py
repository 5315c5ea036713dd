"""Inverse-free K-FAC, a trial for the race: the KFAC-like update of SINGD (IKFAC; Lin et al.,
*Structured Inverse-Free Natural Gradient Descent*, ICML 2024), on kfax's layer table and
statistics. Not part of kfax: it is raced as `kfax_singd` (`race.py --contestants
adam,kfax,kfax_singd`) to see whether dropping the decompositions pays.

For each Kronecker entry it keeps roots `K`, `C` with `K Kᵀ ≈ (A + λ_A I)⁻¹` and
`C Cᵀ ≈ (G + λ_G I)⁻¹`, and on each statistics step moves them by one multiplicative step, with
neither inverse nor decomposition (matrix products only):

  m = ½ (Kᵀ U K + λ_A KᵀK − I),   K ← K (I − β m)

with `U` the batch's A statistic (the same for `C` with G). Its fixed point is `Kᵀ (U + λ_A) K =
I`; a small β averages the statistics over about 1/β statistics steps, as kfac's moving average
with decay 1 − β does. The step is normalized by `max(1, ‖m‖)`, as SINGD's `normalize_lr_cov`
(which takes the largest entry; the Frobenius norm here bounds the spectral one), so that a batch
far from the roots cannot flip or blow them up. λ_A = π√λ and λ_G = √λ/π, kfac's π-factored
damping with π from the batch's traces. The roots start exactly, `K = (U₀ + λ_A)^(-1/2)` from
one eigendecomposition at the first statistics, so that the first update equals kfac's
(`check_first_update`); SINGD starts from `K = I` instead, which on these races of 30 to 300
steps would spend most of them warming up. `K Kᵀ` is formed once per statistics step, so a step
without statistics costs what kfac's does. Norm layers and fallbacks are kfac's (`kfax.kfac` over
the rest of the table); the norm constraint covers every entry, as kfac's does.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import kfax
from kfax import _curvature, _inverse, _table  # a trial beside kfac: its building blocks


class IkfacState(NamedTuple):
  count: jax.Array  # updates so far
  stats_count: jax.Array  # statistics steps absorbed
  roots: dict[str, dict[str, jax.Array]]  # 'a_root', 'g_root': K and C (diagonal sides: vectors)
  inverses: dict[str, dict[str, jax.Array]]  # 'a_inverse', 'g_inverse': K Kᵀ and C Cᵀ
  rest: kfax.KfacState  # kfac on the entries that are not Kronecker


def _rest_table(table: kfax.LayerTable) -> kfax.LayerTable:
  """The table with its Kronecker entries passed through (curvature 'none')."""
  entries = tuple(e._replace(curvature='none') if e.curvature == 'kronecker' else e
                  for e in table.entries.values())
  return kfax.LayerTable(entries, table.shapes, table.sequence)


def _eye_like(m: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)


def _exact_root(u: jax.Array, shift: jax.Array, diagonal: bool) -> jax.Array:
  """`(U + shift I)^(-1/2)` as `Q diag(d + shift)^(-1/2)`: one eigendecomposition."""
  if diagonal:
    return jax.lax.rsqrt(u + shift[..., None])
  flat = u.reshape((-1,) + u.shape[-2:])
  vals, vecs = _inverse.eigendecompose({'u': flat})['u']
  root = vecs * jax.lax.rsqrt(vals + shift.reshape(-1)[:, None])[:, None, :]
  return root.reshape(u.shape)


def _track(k: jax.Array, u: jax.Array, shift: jax.Array, beta: jax.Array,
           diagonal: bool) -> jax.Array:
  """One inverse-free step `K (I − β' m)`, `m = ½ (Kᵀ U K + shift KᵀK − I)`, with the step
  normalized, `β' = β / max(1, ‖m‖)` (Frobenius; the largest entry for a diagonal side), so that
  `I − β' m` stays positive definite when a batch's statistics are far from the roots'."""
  if diagonal:
    m = 0.5 * (k * k * (u + shift[..., None]) - 1.0)
    return k * (1.0 - beta / jnp.maximum(1.0, jnp.max(jnp.abs(m), -1, keepdims=True)) * m)
  kt = jnp.swapaxes(k, -1, -2)
  m = 0.5 * (kt @ u @ k + shift[..., None, None] * (kt @ k) - _eye_like(k))
  norm = jnp.sqrt(jnp.sum(m * m, axis=(-2, -1), keepdims=True))
  return k - beta / jnp.maximum(1.0, norm) * (k @ m)


def _inverse_of(root: jax.Array, diagonal: bool) -> jax.Array:
  return root * root if diagonal else root @ jnp.swapaxes(root, -1, -2)


def ikfac(table: kfax.LayerTable, damping: float = 1e-4, beta: float = 0.05,
          norm_constraint: float | None = 1e-3) -> optax.GradientTransformationExtraArgs:
  """Inverse-free K-FAC on the Kronecker entries of `table`, kfac on the rest (module docstring).

  `update(updates, state, params=None, *, stats)`, as `kfax.kfac`'s.
  """
  kron = table.of('kronecker')
  rest = kfax.kfac(_rest_table(table), damping=damping, ema_decay=1.0 - beta,
                   norm_constraint=None)

  def init(params):
    roots, inverses = {}, {}
    for key, e in kron.items():
      shapes = e.stat_shapes()
      ones = lambda n: jnp.broadcast_to(jnp.eye(shapes[n][-1], dtype=jnp.float32), shapes[n]) + 0.0
      roots[key] = {f'{s}_root': (jnp.ones(shapes[f'{s}_factor'], jnp.float32) if d
                                  else ones(f'{s}_factor')) for s, d in zip('ag', e.diag)}
      inverses[key] = {f'{s}_inverse': v + 0.0 for s, v in zip('ag', roots[key].values())}
    zero = lambda: jnp.zeros((), jnp.int32)
    return IkfacState(zero(), zero(), roots, inverses, rest.init(params))

  def absorb(state: IkfacState, stats: dict) -> IkfacState:
    first = state.stats_count == 0
    roots, inverses = dict(state.roots), dict(state.inverses)
    for key, e in kron.items():
      u = stats[key]
      pi = _curvature.pi_correction(e, u)
      shifts = (pi * jnp.sqrt(damping), jnp.sqrt(damping) / pi)
      new = {}
      for side, diagonal, shift in zip('ag', e.diag, shifts):
        args = (u[f'{side}_factor'], shift)
        old = state.roots[key][f'{side}_root']
        new[f'{side}_root'] = jax.lax.cond(
            first, lambda k, a, d=diagonal: _exact_root(*a, d),
            lambda k, a, d=diagonal: _track(k, a[0], a[1], jnp.float32(beta), d), old, args)
      ok = _inverse.all_finite(new)
      roots[key] = {n: jnp.where(ok, v, state.roots[key][n]) for n, v in new.items()}
      inverses[key] = {f'{s}_inverse': _inverse_of(roots[key][f'{s}_root'], d)
                       for s, d in zip('ag', e.diag)}
    return state._replace(stats_count=state.stats_count + 1, roots=roots, inverses=inverses)

  curved = {leaf for e in table.entries.values() if e.curvature != 'none' for leaf in e.leaves}

  def update(grads, state, params=None, *, stats):
    rest_stats = None if stats is None else {k: v for k, v in stats.items() if k not in kron}
    updates, rest_state = rest.update(grads, state.rest, params, stats=rest_stats)
    if stats is not None:
      state = absorb(state, stats)
    leaves, treedef = jax.tree.flatten(updates)
    values = dict(zip(table.shapes, leaves))
    ready = state.stats_count > 0
    for key, e in kron.items():
      x = _table.to_matrix(e, values)
      v = _curvature.precondition_kronecker(e, x, state.inverses[key], damping, eigen=False)
      values.update(_table.from_matrix(e, jnp.where(ready, v, x.astype(v.dtype)), values))
    if norm_constraint is not None:  # min(1, sqrt(c / vᵀg)) over every curved parameter
      raw = dict(zip(table.shapes, jax.tree.leaves(grads)))
      inner = sum(jnp.vdot(values[p].astype(jnp.float32), raw[p].astype(jnp.float32))
                  for p in curved)
      scale = jnp.minimum(1.0, jnp.sqrt(norm_constraint / jnp.maximum(inner, 1e-30)))
      scale = jnp.where(ready & jnp.isfinite(scale), scale, 1.0)
      values = {p: (v * scale).astype(v.dtype) if p in curved else v for p, v in values.items()}
    return jax.tree.unflatten(treedef, list(values.values())), state._replace(
        count=state.count + 1, rest=rest_state)

  return optax.GradientTransformationExtraArgs(init, update)


def check_first_update(task, damping: float = 1e-3) -> float:
  """Largest relative difference between the first updates of `ikfac` and `kfax.kfac` (same
  damping, statistics and norm constraint) on a race task: both invert the first statistics
  exactly, so they must agree to float32 rounding."""
  params, rest = task.init(0)
  batch = tuple(a[0] for a in task.batches(0, 1))
  grad_fn = kfax.value_grad_and_stats(task.loss, has_aux=True, fisher='mc')
  table = grad_fn.layers(params, rest, *batch)
  _, grads, stats = grad_fn(params, rest, *batch, rng=jax.random.key(0))
  out = []
  for tx in (ikfac(table, damping), kfax.kfac(table, damping)):
    out.append(jax.jit(lambda g, s, st, tx=tx: tx.update(g, tx.init(params), stats=st)[0])(
        grads, None, stats))
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))), *out)
  return max(jax.tree.leaves(diffs))


if __name__ == '__main__':  # python benchmarks/singd.py: the first-update check on race tasks
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import race
  for name in sys.argv[1:] or list(race.TASKS):
    worst = check_first_update(race.TASKS[name]())
    print(f'{name}: first update, ikfac against kfac: max relative difference {worst:.2e}')
    assert worst < 1e-3, name
