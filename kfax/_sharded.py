"""KAISA's MEM-OPT for `kfac(gather="gradients")`: each device keeps only its own layers' curvature.

Kronecker layers are assigned to devices by the greedy n³ balance of their decompositions (a
layer's A and G stay together: preconditioning needs both). A device's share of the state is one
flat float32 buffer, its *shard*, laid out statically per device:

    [packed factors of its layers | pad] [decompositions of its layers | pad]

- Statistics: one reduce-scatter of the packed statistics, laid out by owner, hands each device the
  device-mean of its own factors (half the traffic of the all-reduce that replicates them).
- Refreshes: each device decomposes its own factors (`_curvature.refresh`, the same refresh as the
  replicated mode); no communication but one scalar.
- Preconditioning, every step: each device preconditions its own layers' gradients and one
  all-reduce of the zero-filled results (exactly the size of the layers' gradients) gives every
  device every layer. An all-gather would move half as much, but its result is device-varying under
  `shard_map`'s `check_vma`, where updates of replicated parameters must be invariant.

Unit-wise and diagonal curvature (O(parameters)) stays replicated.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kfax import _curvature, _distributed, _inverse
from kfax._table import Entry

Field = tuple[str, str, int, tuple[int, ...], bool]  # (layer, name, offset, shape, packed)


class Layout(NamedTuple):
  """Which layers each device owns, and where their arrays sit in its shard."""

  owned: tuple[tuple[str, ...], ...]  # layer keys of each device
  factors: tuple[tuple[Field, ...], ...]  # per device: packed factors, from 0
  decompositions: tuple[tuple[Field, ...], ...]  # per device: from stats_size
  stats_size: int
  shard_size: int

  @property
  def devices(self) -> int:
    return len(self.owned)


def _fields(items: list[tuple[str, str, tuple[int, ...], bool]], start: int) -> tuple:
  out, offset = [], start
  for key, name, shape, packed in items:
    out.append((key, name, offset, shape, packed))
    offset += _distributed.packed_size(shape, packed)
  return tuple(out), offset - start


def layout(entries: dict[str, Entry], devices: int, eigen: bool) -> Layout:
  """The static assignment of Kronecker layers to `devices` and the buffer it implies."""
  cost = lambda e: float(np.prod(e.blocks)) * sum(float(n) ** 3 for n, d in zip(e.dims, e.diag)
                                                  if not d)
  owned = tuple(tuple(keys) for keys in _distributed.assign(
      {k: cost(e) + 1.0 for k, e in entries.items()}, devices))
  stats, decomps = [], []
  for keys in owned:
    stats.append([(k, n, s, entries[k].dense(n))
                  for k in keys for n, s in entries[k].stat_shapes().items()])
    decomps.append([(k, n, s, False) for k in keys
                    for n, s in _curvature.decomposition_shapes(entries[k], eigen).items()])
  stats_size = max((_fields(s, 0)[1] for s in stats), default=0)
  decomp_size = max((_fields(d, 0)[1] for d in decomps), default=0)
  return Layout(owned=owned, factors=tuple(_fields(s, 0)[0] for s in stats),
                decompositions=tuple(_fields(d, stats_size)[0] for d in decomps),
                stats_size=stats_size, shard_size=stats_size + decomp_size)


def _read(shard: jax.Array, field: Field) -> jax.Array:
  _, _, offset, shape, packed = field
  flat = shard[offset:offset + _distributed.packed_size(shape, packed)]
  return _distributed.unpack(flat, [jax.ShapeDtypeStruct(shape, jnp.float32)], [packed])[0]


def _by_layer(shard: jax.Array, fields: tuple[Field, ...]) -> dict[str, dict[str, jax.Array]]:
  out: dict[str, dict[str, jax.Array]] = {}
  for field in fields:
    out.setdefault(field[0], {})[field[1]] = _read(shard, field)
  return out


def _write(shard: jax.Array, fields: tuple[Field, ...], values: dict, start: int) -> jax.Array:
  parts = [_distributed.pack([values[k][n]], [p], jnp.float32) for k, n, _, _, p in fields]
  used = start + sum(p.shape[0] for p in parts)
  return jnp.concatenate([shard[:start], *parts, shard[used:]])


def _on_own_device(layout: Layout, axis_name: Any, branch, *operands):
  """`branch(device)(*operands)` for this device's index: a `lax.switch` of static layouts."""
  index = jax.lax.axis_index(axis_name)
  return jax.lax.switch(index, [branch(d) for d in range(layout.devices)], *operands)


def scatter_statistics(
    stats: dict, layout: Layout, axis_name: Any, comm_dtype: Any
) -> jax.Array:
  """This device's `stats_size` chunk: the device-mean of its layers' packed statistics."""
  chunks = []
  for fields in layout.factors:
    packed = _distributed.pack([stats[k][n] for k, n, *_ in fields],
                               [p for *_, p in fields], jnp.float32)
    pad = jnp.zeros_like(packed, shape=(layout.stats_size - packed.shape[0],))
    chunks.append(jnp.concatenate([packed, pad]))
  total = jax.lax.psum_scatter(
      jnp.concatenate(chunks).astype(comm_dtype), axis_name, scatter_dimension=0, tiled=True)
  return total.astype(jnp.float32) / layout.devices


def absorb(
    shard: jax.Array, chunk: jax.Array, weights: dict[str, jax.Array], layout: Layout,
    axis_name: Any,
) -> jax.Array:
  """EMA of the device's factors, weight `weights[layer]` on the old value."""

  def branch(device: int):
    def run(shard, chunk):
      fields = layout.factors[device]
      w = [jnp.full((_distributed.packed_size(s, p),), weights[k]) for k, _, _, s, p in fields]
      used = sum(x.shape[0] for x in w)
      w = jnp.concatenate([*w, jnp.ones((layout.stats_size - used,))])
      old = shard[:layout.stats_size]
      new = jnp.where(w == 1.0, old, w * old + (1 - w) * chunk)  # w = 1: kept (maybe non-finite)
      return jnp.concatenate([new, shard[layout.stats_size:]])
    return run

  return _on_own_device(layout, axis_name, branch, shard, chunk)


def refresh(
    shard: jax.Array, damping: jax.Array, entries: dict[str, Entry], layout: Layout,
    axis_name: Any, eigen: bool,
) -> tuple[jax.Array, jax.Array]:
  """New decompositions of the device's own factors, and whether any layer on any device failed
  (a failed layer keeps its last good decomposition)."""

  def branch(device: int):
    def run(shard, damping):
      mine = {k: entries[k] for k in layout.owned[device]}
      factors = _by_layer(shard, layout.factors[device])
      new, ok = _curvature.refresh(mine, factors, damping, eigen)
      old = _by_layer(shard, layout.decompositions[device])
      kept = {k: jax.tree.map(lambda n, o: jnp.where(ok[k], n, o), new[k], old[k]) for k in mine}
      failed = jnp.zeros_like(shard, bool, shape=())
      for k in mine:
        failed = failed | ~ok[k]
      return _write(shard, layout.decompositions[device], kept, layout.stats_size), failed
    return run

  shard, failed = _on_own_device(layout, axis_name, branch, shard, damping)
  return shard, jax.lax.psum(failed.astype(jnp.int32), axis_name) > 0


def precondition(
    grads: dict[str, jax.Array], shard: jax.Array, damping: jax.Array,
    entries: dict[str, Entry], layout: Layout, axis_name: Any, eigen: bool,
) -> dict[str, jax.Array]:
  """Every Kronecker layer's preconditioned gradient: each device computes its own layers' and
  one all-reduce of the zero-filled results, all layers in one flat buffer, gathers them."""
  def branch(device: int):
    def run(grads, shard, damping):
      decomps = _by_layer(shard, layout.decompositions[device])
      parts = []
      for key, x in grads.items():
        if key in decomps:
          v = _curvature.precondition_kronecker(entries[key], x, decomps[key], damping, eigen)
          parts.append(v.astype(jnp.float32).ravel())
        else:
          parts.append(jnp.zeros_like(shard, shape=(x.size,)))
      return jnp.concatenate(parts)
    return run

  flat = jax.lax.psum(_on_own_device(layout, axis_name, branch, grads, shard, damping), axis_name)
  out, offset = {}, 0
  for key, x in grads.items():
    out[key] = flat[offset:offset + x.size].reshape(x.shape)
    offset += x.size
  return out


def all_finite_by_layer(stats: dict, axis_name: Any) -> dict[str, jax.Array]:
  """Per layer, whether every device's statistics are finite (one small all-reduce)."""
  keys = list(stats)
  if not keys:
    return {}
  bad = jnp.stack([1 - _inverse.all_finite(stats[k]).astype(jnp.int32) for k in keys])
  bad = jax.lax.psum(bad, axis_name)
  return {k: bad[i] == 0 for i, k in enumerate(keys)}
