"""The layer table: what kfax does with every parameter, from one shape-only trace of the loss.

Each entry covers some leaves of the params tree and says how they form the matrix (or blocks)
its curvature acts on, and the shapes of that curvature. Capture fills exactly the entries of the
table, the optimizer state holds exactly their curvature, and `kfax.summary` prints it.

Curvatures:
- `kronecker`: `A ⊗ G` per block; `a_factor`, `g_factor` of shapes `blocks + (n, n)`, or
  `blocks + (n,)` for a side kept diagonal (an Embed's token side, a side > `max_factor_dim`).
- `unitwise`: per channel the `k x k` Fisher of (scale, bias), `fisher` of `blocks + (C, k, k)`.
- `diagonal` (the fallback): the diagonal Fisher of one parameter, `diag` of its shape.
- `none` (`fallback="none"`): the gradient passes through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
from flax import nnx
import jax

from kfax._kinds import Reshape

def path_name(path: tuple[Any, ...]) -> str:
  """'a/b/c' for a pytree key path or a Flax module path."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        key = getattr(key, attr)
        break
    parts.append(str(key))
  return '/'.join(parts)


def _is_box(x: Any) -> bool:
  return isinstance(x, (nn.meta.AxisMetadata, nnx.Variable))


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
  """`(path, leaf)` of every array of a params tree, in `jax.tree.leaves` order; a boxed
  parameter (`nn.Partitioned`, an `nnx.Variable`) is named by its place, without the box."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]:
    for _, value in jax.tree_util.tree_flatten_with_path(leaf)[0]:
      out.append((path_name(path), value))
  return out


class Entry(NamedTuple):
  """One row of the table: a captured layer, or one parameter's fallback."""

  key: str  # the layer's params subtree ('Block_0/Dense_0'), or the parameter's own path
  kind: str  # 'dense', 'conv', 'embed', 'norm', or 'fallback'
  curvature: str  # one of CURVATURES
  leaves: tuple[str, ...]  # the parameters it covers, by path
  layout: tuple[Reshape | None, ...]  # per leaf: how it becomes matrix blocks
  stack: tuple[int, ...]  # leading axes of stacked layers (nn.scan, nn.vmap)
  blocks: tuple[int, ...]  # leading axes of the curvature arrays
  dims: tuple[int, int]  # Kronecker: (A side, G side); unit-wise: (channels, k); else ()
  diag: tuple[bool, bool]  # Kronecker sides kept diagonal
  roles: tuple[tuple[str, tuple[bool, bool]], ...]  # (role, which sides N scales) of its calls
  note: str  # what the summary says besides the rule

  def dense(self, name: str) -> bool:
    """Whether statistic `name` is a stack of symmetric matrices (packed as upper triangles
    for communication): Kronecker sides not kept diagonal, and unit-wise blocks."""
    if name in ('a_factor', 'g_factor'):
      return not self.diag['ag'.index(name[0])]
    return name == 'fisher'

  def stat_shapes(self) -> dict[str, tuple[int, ...]]:
    """Shapes of the statistics (and EMA factors) of this entry."""
    if self.curvature == 'kronecker':
      side = lambda n, d: (n,) if d else (n, n)
      return {'a_factor': self.blocks + side(self.dims[0], self.diag[0]),
              'g_factor': self.blocks + side(self.dims[1], self.diag[1])}
    if self.curvature == 'unitwise':
      c, k = self.dims
      return {'fisher': self.blocks + (c, k, k)}
    if self.curvature == 'diagonal':
      return {'diag': self.blocks}
    return {}


class LayerTable:
  """Every parameter's entry, by key, in params order. Static: compare with `==`."""

  def __init__(self, entries: tuple[Entry, ...], shapes: dict[str, tuple[int, ...]],
               sequence: str):
    self.entries = {e.key: e for e in entries}
    self.shapes = dict(shapes)  # every parameter's shape, by path
    self.sequence = sequence

  def _fields(self) -> tuple:
    return tuple(self.entries.values()), tuple(self.shapes.items()), self.sequence

  def __eq__(self, other: object) -> bool:
    return isinstance(other, LayerTable) and self._fields() == other._fields()

  def __hash__(self) -> int:
    return hash(self._fields())

  def __repr__(self) -> str:
    counts: dict[str, int] = {}
    for e in self.entries.values():
      counts[e.curvature] = counts.get(e.curvature, 0) + 1
    return f'LayerTable({counts}, sequence={self.sequence!r})'

  def of(self, curvature: str) -> dict[str, Entry]:
    return {k: e for k, e in self.entries.items() if e.curvature == curvature}


def to_matrix(entry: Entry, values: dict[str, jax.Array]) -> jax.Array:
  """The entry's parameters (by leaf path) as its curvature's operand: Kronecker
  `blocks + (rows, cols)` (bias as the last row), unit-wise `blocks + (C, k)`, else the leaf."""
  if entry.curvature == 'kronecker':
    parts = [r.forward(values[leaf], entry.stack) for leaf, r in zip(entry.leaves, entry.layout)]
    x = parts[0] if len(parts) == 1 else jax.numpy.concatenate(parts, axis=-2)
    return x.reshape(entry.blocks + x.shape[-2:])
  if entry.curvature == 'unitwise':
    return jax.numpy.stack([values[leaf].reshape(entry.blocks + (entry.dims[0],))
                            for leaf in entry.leaves], axis=-1)
  return values[entry.leaves[0]]


def from_matrix(entry: Entry, x: jax.Array, like: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Inverse of `to_matrix`, in the shapes and dtypes of `like`."""
  out = {}
  if entry.curvature == 'kronecker':
    x = x.reshape(entry.stack + (-1,) + x.shape[-2:])
    row = 0
    for leaf, r in zip(entry.leaves, entry.layout):
      rows = r.out[-2]
      part = x[..., row:row + rows, :]
      row += rows
      shape = like[leaf].shape[len(entry.stack):]
      out[leaf] = r.backward(part, entry.stack, shape).astype(like[leaf].dtype)
  elif entry.curvature == 'unitwise':
    for i, leaf in enumerate(entry.leaves):
      out[leaf] = x[..., i].reshape(like[leaf].shape).astype(like[leaf].dtype)
  else:
    out[entry.leaves[0]] = x.astype(like[entry.leaves[0]].dtype)
  return out


def insert(tree: Any, path: tuple[str, ...], name: str, value: Any) -> Any:
  """`tree` with `value` added under `path + (name,)`, rebuilding the mappings on the way."""
  if not path:
    return type(tree)({**tree, name: value}) if not isinstance(tree, dict) else {**tree,
                                                                                   name: value}
  head, rest = path[0], path[1:]
  child = insert(tree[head], rest, name, value)
  items = {**tree, head: child}
  return items if isinstance(tree, dict) else type(tree)(items)


def subtree_paths(tree: Any) -> list[tuple[str, ...]]:
  """Paths of every mapping in a params tree (the places layers' parameters live)."""
  out = []

  def walk(node: Any, path: tuple[str, ...]) -> None:
    if isinstance(node, Mapping):
      out.append(path)
      for k, v in node.items():
        walk(v, path + (str(k),))

  walk(tree, ())
  return out

