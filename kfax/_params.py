"""Where Kronecker-factored layers live in a params tree, and their gradients as matrices.

A layer is a subtree holding a `kernel` of rank >= 2 (Flax `Dense`: `(in, out)`; `Conv`:
`(*window, in, out)`), and optionally a `bias` of shape `(out,)`. Its gradient matrix stacks the
kernel reshaped to `(prod(kernel.shape[:-1]), out)` over the bias row, matching the A factor's
layout (inputs, then the homogeneous coordinate).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kfax._capture import path_name


class LayerSlots(NamedTuple):
  """Positions of a layer's leaves in `jax.tree.leaves(tree)`."""

  kernel: int
  bias: int | None
  kernel_shape: tuple[int, ...]

  @property
  def dims(self) -> tuple[int, int]:
    """(d_in, d_out): A's and G's sizes."""
    return int(np.prod(self.kernel_shape[:-1])) + (self.bias is not None), self.kernel_shape[-1]


def find_layers(tree: Any) -> dict[str, LayerSlots]:
  """Every subtree with a rank >= 2 `kernel`, by its '/'-joined path."""
  children: dict[str, dict[str, tuple[int, Any]]] = {}
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    children.setdefault(path_name(path[:-1]), {})[path_name(path[-1:])] = (i, leaf)
  layers = {}
  for name, leaves in children.items():
    if 'kernel' not in leaves or jnp.ndim(leaves['kernel'][1]) < 2:
      continue
    kernel_index, kernel = leaves['kernel']
    bias_index, bias = leaves.get('bias', (None, None))
    if bias is not None and jnp.shape(bias) != jnp.shape(kernel)[-1:]:
      bias_index = None
    layers[name] = LayerSlots(kernel_index, bias_index, tuple(jnp.shape(kernel)))
  return layers


def gradient_matrix(leaves: list[jax.Array], slots: LayerSlots) -> jax.Array:
  """The float32 `(d_in, d_out)` matrix of a layer's kernel (and bias row) gradients."""
  kernel = leaves[slots.kernel]
  dtype = jnp.promote_types(kernel.dtype, jnp.float32)
  rows = [kernel.reshape(-1, slots.kernel_shape[-1]).astype(dtype)]
  if slots.bias is not None:
    rows.append(leaves[slots.bias][None].astype(dtype))
  return jnp.concatenate(rows) if len(rows) > 1 else rows[0]


def set_gradient_matrix(leaves: list[jax.Array], slots: LayerSlots, x: jax.Array) -> None:
  """Writes `x` back into the layer's leaves, in their shapes and dtypes."""
  kernel = leaves[slots.kernel]
  n_kernel = int(np.prod(slots.kernel_shape[:-1]))
  leaves[slots.kernel] = x[:n_kernel].reshape(slots.kernel_shape).astype(kernel.dtype)
  if slots.bias is not None:
    leaves[slots.bias] = x[n_kernel].astype(leaves[slots.bias].dtype)
