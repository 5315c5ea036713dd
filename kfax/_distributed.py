"""Data-parallel K-FAC over a named axis (`pmap`, `shard_map`): collectives of kfax.kfac.

- Statistics: each device's factors are averaged in one all-reduce of one flat buffer holding
  every factor's upper triangle, n(n+1)/2 numbers instead of n², in `comm_dtype`.
- Refreshes: the eigendecompositions (or inverses) are assigned to devices by a greedy
  longest-processing-time balance of their n³ cost. Each device runs only its own share (a
  `lax.switch` on its axis index) and one all-reduce of the zero-filled results gathers them,
  so every device then preconditions every layer locally (KAISA's COMM-OPT: the least
  communication per step, none on steps without statistics or refresh).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

AxisName = Any  # str or tuple of str, as jax.lax collectives take them


def _packs(x: jax.Array, symmetric: bool) -> bool:
  return symmetric and x.ndim >= 2 and x.shape[-1] == x.shape[-2]


def packed_size(shape: tuple[int, ...], symmetric: bool) -> int:
  """Numbers of a statistic in a packed buffer: upper triangles of symmetric stacks."""
  if symmetric and len(shape) >= 2 and shape[-1] == shape[-2]:
    n = shape[-1]
    return int(np.prod(shape[:-2])) * n * (n + 1) // 2
  return int(np.prod(shape))


def pack(mats: list[jax.Array], symmetric: list[bool], dtype: Any) -> jax.Array:
  """One flat vector of the statistics: the upper triangles of symmetric (stacks of) matrices,
  every other array whole."""
  parts = []
  for m, sym in zip(mats, symmetric):
    if _packs(m, sym):
      rows, cols = np.triu_indices(m.shape[-1])
      parts.append(m[..., rows, cols].reshape(-1).astype(dtype))
    else:
      parts.append(m.reshape(-1).astype(dtype))
  return jnp.concatenate(parts) if parts else jnp.zeros((0,), dtype)


def unpack(flat: jax.Array, like: list[Any], symmetric: list[bool]) -> list[jax.Array]:
  """Inverse of `pack`, in the shapes and dtypes of `like`."""
  out, offset = [], 0
  for m, sym in zip(like, symmetric):
    size = packed_size(m.shape, sym)
    part = flat[offset:offset + size].astype(m.dtype)
    offset += size
    if sym and len(m.shape) >= 2 and m.shape[-1] == m.shape[-2]:
      n = m.shape[-1]
      rows, cols = np.triu_indices(n)
      upper = jnp.zeros(m.shape, m.dtype).at[..., rows, cols].set(
          part.reshape(m.shape[:-2] + (rows.size,)))
      out.append(upper + jnp.swapaxes(jnp.triu(upper, 1), -1, -2))
    else:
      out.append(part.reshape(m.shape))
  return out


def pack_symmetric(mats: list[jax.Array], dtype: Any) -> jax.Array:
  """The upper triangles of symmetric matrices, concatenated into one flat vector."""
  return pack(mats, [True] * len(mats), dtype)


def unpack_symmetric(flat: jax.Array, like: list[Any]) -> list[jax.Array]:
  """Inverse of `pack_symmetric`, in the dtypes of `like`."""
  return unpack(flat, like, [True] * len(like))


def mean_statistics(
    stats: Any, axis_name: AxisName, comm_dtype: Any,
    dense: Callable[[str, str], bool] | None = None,
) -> Any:
  """Averages `{layer: {name: statistic}}` across devices in one packed all-reduce;
  `dense(layer, name)` (default: every square matrix) says which are packed as upper triangles."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(stats)
  leaves = [leaf for _, leaf in paths]
  symmetric = [True if dense is None else dense(*(str(k.key) for k in p[-2:])) for p, _ in paths]
  flat = jax.lax.pmean(pack(leaves, symmetric, comm_dtype), axis_name)
  return jax.tree.unflatten(treedef, unpack(flat, leaves, symmetric))



def assign(costs: dict[Hashable, float], devices: int) -> list[list[Hashable]]:
  """Greedy longest-processing-time assignment: the costliest job goes to the least loaded
  device. Its largest load is at most 4/3 of the optimum (Graham, 1969)."""
  loads = [(0.0, d) for d in range(devices)]
  owned: list[list[Hashable]] = [[] for _ in range(devices)]
  for key in sorted(costs, key=lambda k: (-costs[k], str(k))):
    load, device = heapq.heappop(loads)
    owned[device].append(key)
    heapq.heappush(loads, (load + costs[key], device))
  return owned


def split_work(
    fn: Callable[[dict], dict], work: dict[Hashable, jax.Array], axis_name: AxisName
) -> dict:
  """`fn(work)` with each device computing only its assigned keys, then gathered."""
  devices = jax.lax.psum(1, axis_name)
  owned = assign({k: float(m.shape[-1]) ** 3 for k, m in work.items()}, devices)
  shapes = jax.eval_shape(fn, work)

  def branch(keys: list[Hashable]) -> Callable[[dict], dict]:
    def run(work: dict) -> dict:
      mine = fn({k: work[k] for k in keys}) if keys else {}
      return {k: mine[k] if k in mine else jax.tree.map(jnp.zeros_like, shapes[k])
              for k in shapes}
    return run

  index = jax.lax.axis_index(axis_name)
  local = jax.lax.switch(index, [branch(keys) for keys in owned], work)
  return jax.lax.psum(local, axis_name)
