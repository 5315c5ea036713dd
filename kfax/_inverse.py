"""Factor decompositions, batched by size: eigendecompositions and Cholesky inverses.

`_curvature.py` builds the damped matrices and applies the results (both damping modes, per
curvature of the layer table); this module only decomposes symmetric matrices, in the dtype
they come in (float32 from kfax), and checks results for finiteness.

Factors of equal size are decomposed together in one batched call (one by one on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Decomposition = tuple[jax.Array, ...]


def _one_call_per_matrix() -> bool:
  """Whether to decompose matrices one by one instead of in batches of equal size.

  On CPU, JAX's LAPACK kernels hand work to XLA's intra-op thread pool and block until it
  finishes; two such calls running at once can deadlock a small pool (seen with jax 0.10.2 on
  2 cores: both pool threads waiting in the kernels' batch map). There the matrices are
  decomposed one after another, each call ordered after the previous one's result. Accelerators
  keep the batched kernels, which are much faster for many small matrices.
  """
  return jax.default_backend() == 'cpu'


def _batched(fn: Callable, mats: dict[Any, jax.Array]) -> dict[Any, Decomposition]:
  """Applies a batched `fn(stack) -> tuple of stacks` to each equal-shape group of `mats`."""
  if _one_call_per_matrix():
    results, previous = {}, ()
    for key, m in mats.items():
      outs = []
      for single in m.reshape((-1,) + m.shape[-2:]):  # a stack (nn.scan, groups): one by one
        previous, single = jax.lax.optimization_barrier((previous, single))  # one LAPACK call
        previous = tuple(fn(single))
        outs.append(previous)
      results[key] = tuple(jnp.stack(parts).reshape(m.shape[:-2] + parts[0].shape)
                           for parts in zip(*outs))
    return results
  groups: dict[tuple[int, ...], list[Any]] = {}
  for key, m in mats.items():
    groups.setdefault(m.shape, []).append(key)
  results = {}
  for keys in groups.values():
    outs = fn(jnp.stack([mats[k] for k in keys]))
    results.update({k: tuple(out[i] for out in outs) for i, k in enumerate(keys)})
  return results


def _symmetric(m: jax.Array) -> jax.Array:
  return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def _eigh(stack: jax.Array) -> tuple[jax.Array, jax.Array]:
  vals, vecs = jnp.linalg.eigh(_symmetric(stack))
  return jnp.maximum(vals, 0.0), vecs


def _inv_psd(stack: jax.Array) -> tuple[jax.Array]:
  # Two triangular solves against I: 10-20% faster on CPU than L⁻¹ then L⁻ᵀL⁻¹ (n = 145-1153).
  chol = jnp.linalg.cholesky(_symmetric(stack))
  eye = jnp.broadcast_to(jnp.eye(stack.shape[-1], dtype=stack.dtype), stack.shape)
  return (jax.scipy.linalg.cho_solve((chol, True), eye),)


def eigendecompose(mats: dict[Any, jax.Array]) -> dict[Any, Decomposition]:
  """`(eigenvalues floored at 0, eigenvectors)` of each symmetric matrix, batched by size."""
  return _batched(_eigh, mats)


def invert(mats: dict[Any, jax.Array]) -> dict[Any, Decomposition]:
  """`(inverse,)` of each symmetric positive definite matrix (Cholesky), batched by size."""
  return _batched(_inv_psd, mats)


def all_finite(tree) -> jax.Array:
  """One boolean: every leaf of `tree` is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
