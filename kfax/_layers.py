"""One function per layer kind: a layer call's input and output gradient -> A and G terms.

For a layer with per-example input `a` (with a trailing 1 when it has a bias) and per-example
output gradient `g = N * dL/dy` (the loss is a mean over N examples):

- Dense (`nn.Dense`, inputs of any rank, every leading axis indexes examples):
  `A = mean aaᵀ`, `G = mean ggᵀ`.
- Conv (`nn.Conv`, 1 to 3 spatial dims): `a_t` is the input patch at output position `t` in
  the kernel's own (spatial..., channel) order. Following KFC (Grosse & Martens, 2016) and
  chainerkfac, A sums over the T positions and G averages over them:
  `A = mean Σ_t a_t a_tᵀ`, `G = mean (1/T) Σ_t g_t g_tᵀ`, so that
  `A ⊗ G = mean Σ_t (a_t a_tᵀ) ⊗ (g_t g_tᵀ)` when inputs are spatially uniform.

Each function returns float32 `(a_factor, g_factor)`; a module called several times adds its A
terms and averages its G terms in the same way (`_capture.py`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

FactorFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _as_f32_rows(x: jax.Array, width: int) -> jax.Array:
  return x.reshape(-1, width).astype(jnp.promote_types(x.dtype, jnp.float32))


def _with_ones(rows: jax.Array) -> jax.Array:
  return jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)


def _covariance(rows: jax.Array, scale: float) -> jax.Array:
  return (rows.T @ rows) * scale


def dense_factors(use_bias: bool, x: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A and G of one `nn.Dense` call: `x` is its input `(..., in)`, `dy` is dL/dy `(..., out)`."""
  a = _as_f32_rows(x, x.shape[-1])
  n = a.shape[0]
  if use_bias:
    a = _with_ones(a)
  g = _as_f32_rows(dy, dy.shape[-1])
  return _covariance(a, 1.0 / n), _covariance(g, float(n))


def _tuple(value: Any, rank: int, name: str) -> tuple[int, ...]:
  if value is None:
    return (1,) * rank
  if isinstance(value, int):
    return (value,) * rank
  value = tuple(value)
  if len(value) != rank:
    raise ValueError(f'kfax: nn.Conv `{name}` must have {rank} entries, got {value}.')
  return value


def _spatial_pads(
    padding: Any, spatial: Sequence[int], window: Sequence[int], strides: Sequence[int]
) -> list[tuple[int, int]]:
  """Explicit (low, high) pads per spatial dim, as `flax.linen.Conv` and `lax.conv` read them."""
  rank = len(spatial)
  if isinstance(padding, str):
    # lax.conv_general_dilated resolves strings against the undilated input shape.
    return list(jax.lax.padtype_to_pads(spatial, window, strides, padding))
  if isinstance(padding, int):
    return [(padding, padding)] * rank
  padding = list(padding)
  if len(padding) == 1 and rank > 1:
    padding = padding * rank
  return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def conv_patches(module: nn.Conv, x: jax.Array) -> tuple[jax.Array, int]:
  """The input patches of an `nn.Conv` call, `(N, T, K * C)` in kernel order, and N."""
  kernel_size = tuple(module.kernel_size)
  rank = len(kernel_size)
  strides = _tuple(module.strides, rank, 'strides')
  input_dilation = _tuple(module.input_dilation, rank, 'input_dilation')
  kernel_dilation = _tuple(module.kernel_dilation, rank, 'kernel_dilation')
  x = x.reshape((-1,) + x.shape[x.ndim - rank - 1 :])  # flax flattens batch dims, or adds one
  n = x.shape[0]
  window = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
  padding = module.padding.upper() if isinstance(module.padding, str) else module.padding
  if padding == 'CIRCULAR':
    wrap = [(0, 0)] + [((w - 1) // 2, w // 2) for w in window] + [(0, 0)]
    x, padding = jnp.pad(x, wrap, mode='wrap'), 'VALID'
  elif padding == 'CAUSAL':
    x, padding = jnp.pad(x, [(0, 0), (window[0] - 1, 0), (0, 0)]), 'VALID'
  pads = _spatial_pads(padding, x.shape[1:-1], window, strides)
  config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, input_dilation)] + [(0, 0, 0)]
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  out = [(size - w) // s + 1 for size, w, s in zip(x.shape[1:-1], window, strides)]
  slices = []
  for offset in itertools.product(*(range(k) for k in kernel_size)):
    start = [0] + [o * d for o, d in zip(offset, kernel_dilation)] + [0]
    limit = [n] + [b + (o - 1) * s + 1 for b, o, s in zip(start[1:], out, strides)] + [x.shape[-1]]
    slices.append(jax.lax.slice(x, start, limit, [1, *strides, 1]))
  patches = jnp.stack(slices, axis=-2)  # (N, *out, K, C)
  return patches.reshape(n, math.prod(out), -1), n


def conv_factors(module: nn.Conv, x: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A and G of one `nn.Conv` call (spatial sum for A, spatial mean for G)."""
  patches, n = conv_patches(module, x)
  t = patches.shape[1]
  if t * n * module.features != dy.size:
    raise AssertionError(f'kfax: conv patches {patches.shape} do not match the output {dy.shape}.')
  a = _as_f32_rows(patches, patches.shape[-1])
  if module.use_bias:
    a = _with_ones(a)
  g = _as_f32_rows(dy, dy.shape[-1])
  return _covariance(a, 1.0 / n), _covariance(g, n / t)


def _dense(module: nn.Dense) -> tuple[FactorFn | None, str]:
  return (lambda x, dy: dense_factors(module.use_bias, x, dy)), ''


def _conv(module: nn.Conv) -> tuple[FactorFn | None, str]:
  if module.feature_group_count != 1:
    return None, f'feature_group_count={module.feature_group_count} (grouped or depthwise)'
  if module.mask is not None:
    return None, 'a kernel `mask`'
  if len(tuple(module.kernel_size)) not in (1, 2, 3):
    return None, f'{len(tuple(module.kernel_size))} spatial dims'
  return (lambda x, dy: conv_factors(module, x, dy)), ''


# Layer kinds capture preconditions, checked with isinstance in this order.
LAYER_KINDS: dict[type, Callable[[Any], tuple[FactorFn | None, str]]] = {
    nn.Dense: _dense,
    nn.Conv: _conv,
}


def factor_fn(module: nn.Module) -> tuple[FactorFn | None, str] | None:
  """(factor function, '') for a supported call, (None, reason) for an unsupported setting of a
  supported kind, None for a module that holds no Kronecker-factored layer."""
  for kind, make in LAYER_KINDS.items():
    if isinstance(module, kind):
      return make(module)
  return None
