"""`kfax.summary`: what K-FAC does with every parameter, and what it costs."""

from __future__ import annotations

import math

from kfax import _curvature
from kfax._table import LayerTable


def _rule(e) -> str:
  if e.curvature == 'kronecker':
    blocks = f'{math.prod(e.blocks)} x ' if e.blocks else ''
    side = lambda n, d: f'{n}' + (' diag' if d else f'x{n}')
    return f'{e.kind}: {blocks}A {side(e.dims[0], e.diag[0])} ⊗ G {side(e.dims[1], e.diag[1])}'
  if e.curvature == 'unitwise':
    return f'{e.kind}: unit-wise {e.dims[1]}x{e.dims[1]} per channel ({e.dims[0]})'
  if e.curvature == 'diagonal':
    return 'diagonal fallback'
  return 'passes through (fallback="none")'


def _state_bytes(e, eigen: bool) -> int:
  shapes = dict(e.stat_shapes())
  if e.curvature == 'kronecker':
    shapes.update({f'd_{n}': s for n, s in _curvature.decomposition_shapes(e, eigen).items()})
  return sum(math.prod(s) * 4 for s in shapes.values())


def summary(layers: LayerTable, damping_mode: str = 'factored') -> str:
  """A table of every parameter: its shape, its rule, and the bytes of its curvature state.

  Args:
    layers: the layer table, `kfax.value_grad_and_stats(loss_fn).layers(params, *batch)`; the
      same table `kfax.kfac` preconditions with, so the summary is what training does.
    damping_mode: the `kfax.kfac` mode whose decompositions to count.

  Returns:
    One line per parameter (path, shape, rule, state bytes; a note where a parameter gets the
    fallback), then the totals of parameter and curvature-state bytes.
  """
  eigen = damping_mode == 'eigen'
  rows, param_bytes, state_bytes = [], 0, 0
  for e in layers.entries.values():
    cost = _state_bytes(e, eigen)
    state_bytes += cost
    for i, leaf in enumerate(e.leaves):
      shape = layers.shapes[leaf]
      param_bytes += math.prod(shape) * 4
      rule = _rule(e) if i == 0 else '  "'
      note = f'  [{e.note}]' if e.note and i == 0 else ''
      rows.append((leaf, str(shape), rule + note, f'{cost:,}' if i == 0 else ''))
  widths = [max([len(r[c]) for r in rows] + [len(h)]) for c, h in
            enumerate(('parameter', 'shape', 'rule', 'state bytes'))]
  line = lambda r: (f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  '
                    f'{r[3]:>{widths[3]}}').rstrip()
  out = [line(('parameter', 'shape', 'rule', 'state bytes'))]
  out += [line(r) for r in rows]
  out.append(f'total: parameters {param_bytes:,} bytes (float32), curvature state'
             f' {state_bytes:,} bytes ({state_bytes / max(param_bytes, 1):.2f}x)')
  return '\n'.join(out)
