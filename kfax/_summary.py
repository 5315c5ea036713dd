"""`kfax.summary`: which parameters K-FAC preconditions and which pass through."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kfax._capture import Stats, path_name
from kfax._params import find_layers


def summary(params: Any, stats: Stats | None = None) -> str:
  """A table of every parameter and what `kfax.kfac` does with it.

  Args:
    params: the parameters given to the optimizer's `init`.
    stats: statistics from `kfax.value_grad_and_stats` for these params; without them, kernels
      are listed as preconditioned once statistics arrive.

  Returns:
    One line per parameter: its path, shape, dtype and either the factor sizes it is
    preconditioned with or why it passes through unchanged.
  """
  layers = find_layers(params)
  owner = {}
  for key, slots in layers.items():
    owner[slots.kernel] = owner[slots.bias] = key
  rows = []
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    key = owner.get(i)
    d_in, d_out = layers[key].dims if key is not None else (0, 0)
    if key is None:
      what = 'passes through: not a Dense/Conv kernel or bias'
    elif stats is not None and key not in stats:
      what = 'passes through: no statistics captured for this layer'
    else:
      what = f'preconditioned: A {d_in}x{d_in}, G {d_out}x{d_out}'
    rows.append((path_name(path), str(tuple(jnp.shape(leaf))), str(jnp.result_type(leaf)), what))
  widths = [max(len(r[c]) for r in rows) for c in range(3)] if rows else [0, 0, 0]
  return '\n'.join(
      f'{p:<{widths[0]}}  {s:<{widths[1]}}  {d:<{widths[2]}}  {w}' for p, s, d, w in rows
  )
