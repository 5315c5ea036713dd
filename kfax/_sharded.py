"""KAISA's MEM-OPT for `kfac(gather="gradients")`: each device keeps only its own layers' curvature.

Layers are assigned to devices by the greedy n³ balance of their two decompositions (a layer's
A and G stay together: preconditioning needs both). A device's share of the state is one flat
float32 buffer, its *shard*, laid out statically per device:

    [A, G upper triangles of its layers | pad] [decompositions of its layers | pad]

- Statistics: one reduce-scatter of the packed statistics, laid out by owner, hands each device the
  device-mean of its own factors (half the traffic of the all-reduce that replicates them), and a
  scalar all-reduce tells every device whether any device's statistics were non-finite.
- Refreshes: each device decomposes its own factors; no communication but one scalar.
- Preconditioning, every step: each device preconditions its own layers' gradients and one
  all-reduce of the zero-filled results (exactly the size of the layers' gradients) gives every
  device every layer. An all-gather would move half as much, but its result is device-varying under
  `shard_map`'s `check_vma`, where updates of replicated parameters must be invariant.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kfax import _distributed, _inverse
from kfax._capture import Stats

Dims = dict[str, tuple[int, int]]


def _triangle(n: int) -> int:
  return n * (n + 1) // 2


def _decomposition_shapes(n: int, eigen: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
  return (('eigvals', (n,)), ('eigvecs', (n, n))) if eigen else (('inverse', (n, n)),)


class Layout(NamedTuple):
  """Which layers each device owns, and the sizes of the per-device buffers."""

  owned: tuple[tuple[str, ...], ...]  # layer keys of each device
  dims: Dims  # (d_in, d_out) of every layer
  eigen: bool
  stats_size: int  # packed factors of a device's layers, padded
  shard_size: int  # stats_size plus the decompositions, padded

  @property
  def devices(self) -> int:
    return len(self.owned)

  def factor_segments(self, device: int) -> list[tuple[str, str, int, int]]:
    """(layer, side, offset, n) of each packed factor in the device's shard."""
    out, offset = [], 0
    for key in self.owned[device]:
      for side, n in zip('ag', self.dims[key]):
        out.append((key, side, offset, n))
        offset += _triangle(n)
    return out

  def decomposition_segments(self, device: int) -> dict[tuple[str, str], tuple[int, tuple]]:
    """{(field, layer): (offset, shape)} of the device's decompositions, e.g. ('a_eigvecs', k)."""
    out, offset = {}, self.stats_size
    for key in self.owned[device]:
      for side, n in zip('ag', self.dims[key]):
        for name, shape in _decomposition_shapes(n, self.eigen):
          out[(f'{side}_{name}', key)] = (offset, shape)
          offset += int(np.prod(shape))
    return out


def layout(dims: Dims, devices: int, eigen: bool) -> Layout:
  """The static assignment of layers to `devices` and the buffer sizes it implies."""
  costs = {k: float(a) ** 3 + float(g) ** 3 for k, (a, g) in dims.items()}
  owned = tuple(tuple(keys) for keys in _distributed.assign(costs, devices))
  per_device = lambda size: max(sum(size(*dims[k]) for k in keys) for keys in owned)
  decompositions = lambda n: sum(int(np.prod(s)) for _, s in _decomposition_shapes(n, eigen))
  stats_size = per_device(lambda a, g: _triangle(a) + _triangle(g))
  return Layout(
      owned=owned,
      dims=dict(dims),
      eigen=eigen,
      stats_size=stats_size,
      shard_size=stats_size + per_device(lambda a, g: decompositions(a) + decompositions(g)),
  )


def _read(buffer: jax.Array, offset: int, shape: tuple[int, ...]) -> jax.Array:
  return buffer[offset:offset + int(np.prod(shape))].reshape(shape)


def _zeros(like: jax.Array, size: int) -> jax.Array:
  """float32 zeros of `like`'s device-variance (`shard_map` branches must agree on it)."""
  return jnp.zeros_like(like, jnp.float32, shape=(size,))


def _padded(parts: list[jax.Array], size: int, like: jax.Array) -> jax.Array:
  return jnp.concatenate([*parts, _zeros(like, size - sum(p.shape[0] for p in parts))])


def _on_own_device(layout: Layout, axis_name: Any, branch, *operands):
  """`branch(device)(*operands)` for this device's index: a `lax.switch` of static layouts."""
  index = jax.lax.axis_index(axis_name)
  return jax.lax.switch(index, [branch(d) for d in range(layout.devices)], *operands)


def scatter_statistics(
    stats: Stats, layout: Layout, axis_name: Any, comm_dtype: Any
) -> tuple[jax.Array, jax.Array]:
  """This device's `stats_size` chunk, the device-mean of its layers' packed factors (zeros for
  layers absent from `stats`), and whether every device's statistics were finite."""
  finite = jax.lax.psum(1 - _inverse.all_finite(stats).astype(jnp.int32), axis_name) == 0
  chunks = []
  for device in range(layout.devices):
    parts = []
    for key, side, _, n in layout.factor_segments(device):
      parts.append(_distributed.pack_symmetric([stats[key][f'{side}_factor']], jnp.float32)
                   if key in stats else jnp.zeros((_triangle(n),), jnp.float32))
    chunks.append(_padded(parts, layout.stats_size, parts[0] if parts else finite))
  total = jax.lax.psum_scatter(
      jnp.concatenate(chunks).astype(comm_dtype), axis_name, scatter_dimension=0, tiled=True)
  return total.astype(jnp.float32) / layout.devices, finite


def absorb(
    shard: jax.Array, chunk: jax.Array, finite: jax.Array, decay: dict[str, jax.Array],
    layout: Layout, axis_name: Any,
) -> jax.Array:
  """EMA of the device's factors with weight `decay[layer]` on the old value (layers absent from
  `decay` keep theirs), if `finite`."""

  def branch(device: int):
    def run(shard, chunk):
      weights = [jnp.full((_triangle(n),), decay[key]) if key in decay
                 else jnp.ones((_triangle(n),)) for key, _, _, n in layout.factor_segments(device)]
      used = sum(w.shape[0] for w in weights)
      w = jnp.concatenate([*weights, jnp.ones((layout.stats_size - used,))])
      old = shard[:layout.stats_size]
      new = jnp.where(finite, w * old + (1 - w) * chunk, old)
      return jnp.concatenate([new, shard[layout.stats_size:]])
    return run

  return _on_own_device(layout, axis_name, branch, shard, chunk)


def refresh(
    shard: jax.Array, damping: jax.Array, layout: Layout, axis_name: Any
) -> tuple[jax.Array, jax.Array]:
  """New decompositions of the device's own factors, and whether any layer on any device failed
  (a failed layer keeps its last good decomposition)."""
  names = [name for name, _ in _decomposition_shapes(1, layout.eigen)]
  decompose = _inverse.eigendecompose if layout.eigen else _inverse.invert

  def branch(device: int):
    def run(shard, damping):
      factors = {(side, key): _distributed.unpack_symmetric(
                     shard[offset:offset + _triangle(n)],
                     [jax.ShapeDtypeStruct((n, n), jnp.float32)])[0]
                 for key, side, offset, n in layout.factor_segments(device)}
      work = {}
      for key in layout.owned[device]:
        a, g = factors[('a', key)], factors[('g', key)]
        work[('a', key)], work[('g', key)] = (
            (a, g) if layout.eigen else _inverse.factored_damping(a, g, damping))
      done = decompose(work) if work else {}
      segments = layout.decomposition_segments(device)
      pieces, failed = [], jnp.zeros_like(shard, bool, shape=())
      for key in layout.owned[device]:
        ok = _inverse.all_finite([done[('a', key)], done[('g', key)]])
        failed = failed | ~ok
        for side in 'ag':
          for name, value in zip(names, done[(side, key)]):
            offset, shape = segments[(f'{side}_{name}', key)]
            pieces.append(jnp.where(ok, value, _read(shard, offset, shape)).ravel())
      used = layout.stats_size + sum(p.shape[0] for p in pieces)
      return jnp.concatenate([shard[:layout.stats_size], *pieces, shard[used:]]), failed
    return run

  shard, failed = _on_own_device(layout, axis_name, branch, shard, damping)
  return shard, jax.lax.psum(failed.astype(jnp.int32), axis_name) > 0


def precondition(
    grads: dict[str, jax.Array], shard: jax.Array, damping: jax.Array, layout: Layout,
    axis_name: Any,
) -> dict[str, jax.Array]:
  """Every layer's preconditioned gradient matrix: each device computes its own layers' and
  one all-reduce of the zero-filled results, all layers in one flat buffer, gathers them."""
  def branch(device: int):
    def run(grads, shard, damping):
      segments = layout.decomposition_segments(device)
      read = lambda field, key: _read(shard, *segments[(field, key)])
      parts = []
      for key, x in grads.items():
        if key not in layout.owned[device]:
          parts.append(_zeros(shard, x.size))
        elif layout.eigen:
          parts.append(_inverse.precondition_eigen(
              x, read('a_eigvecs', key), read('a_eigvals', key), read('g_eigvecs', key),
              read('g_eigvals', key), damping).astype(jnp.float32).ravel())
        else:
          parts.append(_inverse.precondition_factored(
              x, read('a_inverse', key), read('g_inverse', key)).astype(jnp.float32).ravel())
      return jnp.concatenate(parts)
    return run

  flat = jax.lax.psum(_on_own_device(layout, axis_name, branch, grads, shard, damping), axis_name)
  out, offset = {}, 0
  for key, x in grads.items():
    out[key] = _read(flat, offset, x.shape)
    offset += x.size
  return out
