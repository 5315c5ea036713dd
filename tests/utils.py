"""Float64 references for the tests: per-example gradients, dense Kronecker algebra, im2col."""

from __future__ import annotations

import itertools

import jax
import numpy as np


def gradient_matrix(layer_grads: dict) -> np.ndarray:
  """[kernel reshaped to (-1, out); bias row] as a float64 numpy matrix."""
  kernel = np.asarray(layer_grads['kernel'], np.float64)
  rows = [kernel.reshape(-1, kernel.shape[-1])]
  if 'bias' in layer_grads:
    rows.append(np.asarray(layer_grads['bias'], np.float64)[None])
  return np.concatenate(rows)


def per_example_gradients(example_loss, params, xs, ys, key: str) -> np.ndarray:
  """(N, d_in * d_out): row-major vec of each example's gradient matrix of layer `key`,
  from `jax.jacobian` of the vector of per-example losses."""
  losses = lambda p: jax.vmap(lambda x, y: example_loss(p, x[None], y[None]))(xs, ys)
  jac = jax.jacobian(losses)(params)[key]
  return np.stack([gradient_matrix(jax.tree.map(lambda j: j[i], jac)).ravel()
                   for i in range(xs.shape[0])])


def empirical_fisher(per_example: np.ndarray) -> np.ndarray:
  """Mean outer product of per-example gradients."""
  return per_example.T @ per_example / per_example.shape[0]


def kron(a, g) -> np.ndarray:
  """A ⊗ G for a row-major vec of (d_in, d_out) matrices."""
  return np.kron(np.asarray(a, np.float64), np.asarray(g, np.float64))


def im2col(x: np.ndarray, kernel_size, strides, pads, dilation) -> np.ndarray:
  """(N, T, K*C) patches of an NHWC... input by explicit loops, in kernel (window..., C) order."""
  x = np.pad(np.asarray(x, np.float64), [(0, 0), *pads, (0, 0)])
  n, c = x.shape[0], x.shape[-1]
  spatial = x.shape[1:-1]
  window = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
  out = [(s - w) // st + 1 for s, w, st in zip(spatial, window, strides)]
  patches = np.zeros((n, int(np.prod(out)), int(np.prod(kernel_size)) * c))
  for t, pos in enumerate(itertools.product(*(range(o) for o in out))):
    for k, off in enumerate(itertools.product(*(range(ks) for ks in kernel_size))):
      idx = tuple(p * st + o * d for p, st, o, d in zip(pos, strides, off, dilation))
      patches[:, t, k * c:(k + 1) * c] = x[(slice(None), *idx, slice(None))]
  return patches


def compile_counter(fn):
  """Wraps a function so that `calls[0]` counts its traces (a retrace means a recompile)."""
  calls = [0]

  def counted(*args, **kwargs):
    calls[0] += 1
    return fn(*args, **kwargs)

  return jax.jit(counted), calls


def assert_close(actual, expected, rtol=1e-6, atol=1e-9):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# chainerkfac's six ImageNet configurations (github.com/tyohei/chainerkfac at 99e8839,
# examples/imagenet/configs/*.json; the facts file's section 3.1), by global batch: epoch (the
# code's value, one more than its README's), lr, epoch_lr_decay_start, polynomial_decay_p,
# polynomial_epoch, momentum, damping, mixup_alpha. Written here, independently of
# examples/configs/, which the tests check against it.
SEED_IMAGENET = {
    4_096: (36, 8.18e-3, 1, 11, 53, 0.997, 2.5e-4, 0.4),
    8_192: (36, 1.25e-2, 1, 8.0, 53.5, 0.993, 2.5e-4, 0.4),
    16_384: (36, 2.5e-2, 1, 8.0, 53.5, 0.985, 2.5e-4, 0.4),
    32_768: (46, 3.0e-2, 1.5, 3.5, 49.5, 0.97, 2.0e-4, 0.6),
    65_536: (61, 4.0e-2, 2, 2.9, 64.5, 0.95, 1.5e-4, 0.6),
    131_072: (81, 7.0e-2, 1, 3.0, 95.0, 0.93, 1.0e-4, 1.0),
}
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's training set
