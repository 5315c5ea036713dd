"""How each curvature of the layer table is stored, refreshed and applied (all float32).

- `kronecker`: the gradient blocks `X` `(B, rows, cols)` become, per block, with
  `damping_mode="eigen"`, `(A ⊗ G + λ I)⁻¹ vec(X) = Qa [(Qaᵀ X Qg) / (da dgᵀ + λ)] Qgᵀ`, and with
  `"factored"`, `(A + π√λ I)⁻¹ X (G + √λ/π I)⁻¹`, `π = sqrt((tr A / rows) / (tr G / cols))`.
  A diagonal side is its own eigendecomposition (`Q = I`). Only dense sides are decomposed, at
  refreshes; the decompositions are the state's `decompositions`.
- `unitwise` and `diagonal`: `(F + λ' I)⁻¹ x` per channel's `k x k` block or per parameter,
  from the current factor every step (closed form, no decomposition). `λ' = λ` in eigen mode; in
  factored mode `λ' = 2√(λ m) + λ`, `m` the block's mean eigenvalue: exactly what π-factored
  damping adds to a Kronecker block whose factors have those means, so that every parameter of
  the model is damped alike.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kfax import _inverse
from kfax._table import Entry


def init_factors(entry: Entry) -> dict[str, jax.Array]:
  """Identity curvature (never used before the first statistics replace it)."""
  out = {}
  for name, shape in entry.stat_shapes().items():
    if entry.dense(name):
      out[name] = jnp.broadcast_to(jnp.eye(shape[-1], dtype=jnp.float32), shape) + 0.0
    else:
      out[name] = jnp.ones(shape, jnp.float32)
  return out


def decomposition_shapes(entry: Entry, eigen: bool) -> dict[str, tuple[int, ...]]:
  """The refreshed arrays of a Kronecker entry, by name."""
  out = {}
  for side, n, diagonal in zip('ag', entry.dims, entry.diag):
    if eigen:
      out[f'{side}_eigvals'] = entry.blocks + (n,)
      if not diagonal:
        out[f'{side}_eigvecs'] = entry.blocks + (n, n)
    else:
      out[f'{side}_inverse'] = entry.blocks + ((n,) if diagonal else (n, n))
  return out


def init_decompositions(entry: Entry, eigen: bool) -> dict[str, jax.Array]:
  out = {}
  for name, shape in decomposition_shapes(entry, eigen).items():
    square = len(shape) > len(entry.blocks) + 1
    out[name] = (jnp.broadcast_to(jnp.eye(shape[-1], dtype=jnp.float32), shape) + 0.0
                 if square else jnp.ones(shape, jnp.float32))
  return out


def _mean_diagonal(f: jax.Array, diagonal: bool) -> jax.Array:
  return jnp.mean(f if diagonal else jnp.diagonal(f, axis1=-2, axis2=-1), axis=-1)


def pi_correction(entry: Entry, factors: dict[str, jax.Array]) -> jax.Array:
  """Per block π = sqrt((tr A / rows) / (tr G / cols)), 1 where either trace vanishes."""
  a = _mean_diagonal(factors['a_factor'], entry.diag[0])
  g = _mean_diagonal(factors['g_factor'], entry.diag[1])
  ok = (a > 0) & (g > 0)
  return jnp.sqrt(jnp.where(ok, a, 1.0) / jnp.where(ok, g, 1.0))


def refresh(
    entries: dict[str, Entry], factors: dict[str, dict[str, jax.Array]], damping: jax.Array,
    eigen: bool, decompose_all: Callable[[Callable, dict], dict] | None = None,
) -> tuple[dict[str, dict[str, jax.Array]], dict[str, jax.Array]]:
  """New decompositions of Kronecker entries, and per entry whether they are finite.

  `decompose_all(fn, work)` applies `fn` (eigendecompose or invert, batched by shape) to the
  dict of dense matrices; the default runs it here, data parallel callers split it over devices.
  """
  work, out = {}, {}
  for key, e in entries.items():
    f = factors[key]
    if eigen:
      shifts = (0.0, 0.0)
    else:
      pi, root = pi_correction(e, f)[..., None], jnp.sqrt(damping)
      shifts = (pi * root, root / pi)
    out[key] = {}
    for side, diagonal, shift in zip('ag', e.diag, shifts):
      m = f[f'{side}_factor']
      if diagonal:
        out[key][f'{side}_eigvals' if eigen else f'{side}_inverse'] = (
            jnp.maximum(m, 0.0) if eigen else 1.0 / (m + shift))
      else:
        if not eigen:
          m = m + shift[..., None] * jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
        work[(key, side)] = m.reshape((-1,) + m.shape[-2:])
  fn = _inverse.eigendecompose if eigen else _inverse.invert
  done = fn(work) if decompose_all is None else decompose_all(fn, work)
  ok = {}
  for (key, side), result in done.items():
    shape = entries[key].blocks
    if eigen:
      vals, vecs = result
      out[key][f'{side}_eigvals'] = vals.reshape(shape + vals.shape[-1:])
      out[key][f'{side}_eigvecs'] = vecs.reshape(shape + vecs.shape[-2:])
    else:
      out[key][f'{side}_inverse'] = result[0].reshape(shape + result[0].shape[-2:])
  for key in entries:
    ok[key] = _inverse.all_finite(out[key])
  return out, ok


def _side(x: jax.Array, m: jax.Array, diagonal: bool, axis: str) -> jax.Array:
  """`mᵀ x` (axis 'a', rows) or `x m` (axis 'g', columns); a diagonal `m` scales."""
  if diagonal:
    return x * (m[..., :, None] if axis == 'a' else m[..., None, :])
  return jnp.einsum('...ji,...jk->...ik', m, x) if axis == 'a' else x @ m


def precondition_kronecker(
    entry: Entry, x: jax.Array, decomps: dict[str, jax.Array], damping: jax.Array, eigen: bool
) -> jax.Array:
  """The damped Kronecker inverse applied to the gradient blocks `x`."""
  x = x.astype(jnp.float32)
  da, dg = entry.diag
  if not eigen:
    v = _side(x, decomps['a_inverse'], da, 'a')  # symmetric: Aᵀ⁻¹ = A⁻¹
    return _side(v, decomps['g_inverse'], dg, 'g')
  qa, qg = decomps.get('a_eigvecs'), decomps.get('g_eigvecs')
  v = x if da else jnp.einsum('...ji,...jk->...ik', qa, x)
  v = v if dg else v @ qg
  v = v / (decomps['a_eigvals'][..., :, None] * decomps['g_eigvals'][..., None, :] + damping)
  v = v if da else qa @ v
  return v if dg else jnp.einsum('...ij,...kj->...ik', v, qg)


def _block_damping(mean_eigenvalue: jax.Array, damping: jax.Array, eigen: bool) -> jax.Array:
  if eigen:
    return damping
  return 2.0 * jnp.sqrt(damping * jnp.maximum(mean_eigenvalue, 0.0)) + damping


def precondition_unitwise(
    x: jax.Array, fisher: jax.Array, damping: jax.Array, eigen: bool
) -> jax.Array:
  """`(F_c + λ' I)⁻¹ x_c` per channel, `k = x.shape[-1]` in {1, 2}, in closed form."""
  x = x.astype(jnp.float32)
  k = x.shape[-1]
  shift = jnp.broadcast_to(
      _block_damping(jnp.trace(fisher, axis1=-2, axis2=-1) / k, damping, eigen), fisher.shape[:-2])
  if k == 1:
    return x / (fisher[..., 0] + shift[..., None])
  a = fisher[..., 0, 0] + shift
  b = fisher[..., 0, 1]
  c = fisher[..., 1, 0]
  d = fisher[..., 1, 1] + shift
  det = a * d - b * c
  return jnp.stack([(d * x[..., 0] - b * x[..., 1]) / det,
                    (a * x[..., 1] - c * x[..., 0]) / det], axis=-1)


def precondition_diagonal(
    x: jax.Array, diag: jax.Array, damping: jax.Array, eigen: bool
) -> jax.Array:
  return x.astype(jnp.float32) / (diag + _block_damping(diag, damping, eigen))


def precondition(
    entry: Entry, x: jax.Array, factors: dict[str, jax.Array] | None,
    decomps: dict[str, jax.Array] | None, damping: jax.Array, eigen: bool,
) -> jax.Array:
  """The entry's preconditioned gradient (its matrix form, as `x`)."""
  if entry.curvature == 'kronecker':
    return precondition_kronecker(entry, x, decomps, damping, eigen)
  if entry.curvature == 'unitwise':
    return precondition_unitwise(x, factors['fisher'], damping, eigen)
  if entry.curvature == 'diagonal':
    return precondition_diagonal(x, factors['diag'], damping, eigen)
  return x

