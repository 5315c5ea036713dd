"""A and G of Dense and Conv against float64 references: exact Fisher blocks and im2col."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfax
from utils import (assert_close, empirical_fisher, gradient_matrix, im2col, kron,
                   per_example_gradients)

# Under x64 the statistics are float64: the references match them to float64 rounding.
F64 = 1e-10


class Net(nn.Module):
  """A layer under test followed by a Dense head, so G is not trivial."""

  layer: nn.Module

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(self.layer(x))
    return nn.Dense(4, name='head')(h.reshape(h.shape[0], -1))


def _setup(layer, x_shape, seed=0):
  model = Net(layer)
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, x_shape, jnp.float64)
  y = jax.random.randint(ky, x_shape[:1], 0, 4)
  params = model.init(kp, x)['params']
  params = jax.tree.map(
      lambda p: p.astype(jnp.float64) + 0.3 * jax.random.normal(kp, p.shape, jnp.float64), params)
  example_loss = lambda p, x, y: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  return model, params, x, y, example_loss


def _empirical_stats(loss, params, *args):
  """value_grad_and_stats with G from the loss's own gradients (what the references compute)."""
  return kfax.value_grad_and_stats(loss, fisher='empirical')(params, *args)


def _output_gradient(layer, params, x, y) -> np.ndarray:
  """dL/dy at the layer's output, by jax.grad through Net's head (independent of kfax capture)."""
  head = lambda h: nn.Dense(4).apply({'params': params['head']}, jnp.tanh(h).reshape(h.shape[0], -1))
  out = layer.apply({'params': params['layer']}, x)
  return np.asarray(jax.grad(lambda h: kfax.softmax_cross_entropy(head(h), y))(out))


@pytest.mark.parametrize('use_bias', [True, False])
def test_dense_kron_equals_exact_empirical_fisher_for_one_example(x64, use_bias):
  _, params, x, y, loss = _setup(nn.Dense(5, use_bias=use_bias), (1, 3))
  _, _, stats = _empirical_stats(loss, params, x, y)
  exact = empirical_fisher(per_example_gradients(loss, params, x, y, 'layer'))
  for key in ('layer', 'head'):
    # Statistics are float64 under x64 (exact references), float32 otherwise.
    assert stats[key]['a_factor'].dtype == jnp.float64
  a, g = stats['layer']['a_factor'], stats['layer']['g_factor']
  assert a.shape == (3 + use_bias, 3 + use_bias) and g.shape == (5, 5)
  assert_close(kron(a, g), exact, rtol=F64, atol=1e-12)


def test_conv_on_a_1x1_image_is_exact_for_one_example(x64):
  _, params, x, y, loss = _setup(nn.Conv(3, (3, 3), padding='SAME'), (1, 1, 1, 2))
  _, _, stats = _empirical_stats(loss, params, x, y)
  exact = empirical_fisher(per_example_gradients(loss, params, x, y, 'layer'))
  assert_close(kron(stats['layer']['a_factor'], stats['layer']['g_factor']), exact,
               rtol=F64, atol=1e-12)


def test_batch_factors_are_means_over_examples(x64):
  """A = mean aaᵀ and G = mean ggᵀ with g the per-example gradient (N * dL/dy)."""
  n = 6
  _, params, x, y, loss = _setup(nn.Dense(5), (n, 3))
  _, _, stats = _empirical_stats(loss, params, x, y)
  a = np.concatenate([np.asarray(x), np.ones((n, 1))], axis=1)
  assert_close(stats['layer']['a_factor'], a.T @ a / n, rtol=F64, atol=1e-12)
  # Per-example G from each example's own loss: g = dℓ_i/dy.
  per_ex = per_example_gradients(loss, params, x, y, 'layer').reshape(n, 4, 5)
  g = per_ex[:, -1, :]  # the bias row of an example's gradient is its output gradient
  assert_close(stats['layer']['g_factor'], g.T @ g / n, rtol=F64, atol=1e-12)


def test_dense_on_3d_inputs_treats_leading_dims_as_examples(x64):
  """A per-token loss over all (2, 3) positions has N = 6 examples: A = mean over the 6 rows,
  G = N Σ dy dyᵀ with dy = residual / N."""
  model = nn.Dense(2)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4), jnp.float64)
  t = jax.random.normal(jax.random.key(1), (2, 3, 2), jnp.float64)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), model.init(jax.random.key(2), x)['params'])
  loss = lambda p: kfax.squared_error(model.apply({'params': p}, x), t)
  _, grads, stats = _empirical_stats(loss, params)
  rows = np.concatenate([np.asarray(x).reshape(6, 4), np.ones((6, 1))], axis=1)
  residual = (np.asarray(model.apply({'params': params}, x)) - np.asarray(t)).reshape(6, 2)
  assert_close(stats['']['a_factor'], rows.T @ rows / 6, rtol=F64, atol=1e-12)
  assert_close(stats['']['g_factor'], residual.T @ residual / 6, rtol=F64, atol=1e-12)
  assert_close(gradient_matrix(grads), rows.T @ residual / 6, rtol=1e-10)


CONV_CASES = {
    'same': dict(kernel_size=(3, 3), padding='SAME'),
    'valid_stride2': dict(kernel_size=(3, 3), strides=(2, 2), padding='VALID'),
    'dilation_explicit': dict(kernel_size=(2, 3), kernel_dilation=(2, 1), padding=((1, 2), (0, 1))),
    'stride_same_even': dict(kernel_size=(4, 4), strides=2, padding='SAME'),
    'int_padding': dict(kernel_size=(3, 3), padding=1, use_bias=False),
    'conv1d': dict(kernel_size=(3,), strides=(2,), padding='SAME'),
    'conv1d_causal': dict(kernel_size=(3,), kernel_dilation=2, padding='CAUSAL'),
    'conv3d': dict(kernel_size=(2, 2, 2), padding='VALID'),
    'circular': dict(kernel_size=(3, 3), padding='CIRCULAR'),
    'input_dilation': dict(kernel_size=(3, 3), input_dilation=2, padding=((1, 1), (2, 0))),
}
SHAPES = {1: (3, 9, 2), 2: (3, 7, 6, 2), 3: (2, 4, 5, 3, 2)}


@pytest.mark.parametrize('case', sorted(CONV_CASES))
def test_conv_factors_follow_the_spatial_sum_convention(x64, case):
  """A = (1/(N T)) Σ_{i,t} a aᵀ (the mean over all N T rows) and G = N Σ_{i,t} dy dyᵀ, with
  patches from explicit loops, and the kernel gradient equals Σ a dyᵀ, which pins down the patch
  order."""
  cfg = CONV_CASES[case]
  conv = nn.Conv(3, **cfg)
  _, params, x, y, loss = _setup(conv, SHAPES[len(cfg['kernel_size'])])
  _, grads, stats = _empirical_stats(loss, params, x, y)

  # Reference patches: flax applied the padding, strides and dilations; reproduce them by hand.
  rank = len(cfg['kernel_size'])
  strides = np.broadcast_to(cfg.get('strides', 1), rank)
  kdil = np.broadcast_to(cfg.get('kernel_dilation', 1), rank)
  xs = np.asarray(x)
  idil = cfg.get('input_dilation', 1)
  if idil > 1:  # insert zeros between input pixels
    dilated = np.zeros((xs.shape[0], *[(s - 1) * idil + 1 for s in xs.shape[1:-1]], xs.shape[-1]))
    dilated[(slice(None), *[slice(None, None, idil)] * rank)] = xs
    xs = dilated
  window = [(k - 1) * d + 1 for k, d in zip(cfg['kernel_size'], kdil)]
  padding = cfg['padding']
  if padding == 'CIRCULAR':
    xs = np.pad(xs, [(0, 0)] + [((w - 1) // 2, w // 2) for w in window] + [(0, 0)], mode='wrap')
    pads = [(0, 0)] * rank
  elif padding == 'CAUSAL':
    pads = [(window[0] - 1, 0)]
  elif padding in ('SAME', 'VALID'):
    pads = jax.lax.padtype_to_pads(xs.shape[1:-1], window, strides, padding)
  elif isinstance(padding, int):
    pads = [(padding, padding)] * rank
  else:
    pads = padding
  patches = im2col(xs, cfg['kernel_size'], strides, pads, kdil)
  n, t = patches.shape[:2]
  rows = patches.reshape(n * t, -1)
  if cfg.get('use_bias', True):
    rows = np.concatenate([rows, np.ones((n * t, 1))], axis=1)

  dy = _output_gradient(conv, params, x, y).reshape(n * t, -1)
  assert_close(stats['layer']['a_factor'], rows.T @ rows / (n * t), rtol=F64, atol=1e-12)
  assert_close(stats['layer']['g_factor'], dy.T @ dy * n, rtol=F64, atol=1e-12)
  assert_close(gradient_matrix(grads['layer']), rows.T @ dy, rtol=1e-10, atol=1e-12)


def test_conv_kron_is_the_expanded_fisher_on_spatially_uniform_inputs(x64):
  """On an input whose patches are all equal, A ⊗ G = Σ_t (a_t a_tᵀ) ⊗ (g_t g_tᵀ) exactly."""
  conv = nn.Conv(3, (2, 2), padding='VALID')
  _, params, x, y, loss = _setup(conv, (1, 4, 4, 2))
  x = jnp.broadcast_to(x[:, :1, :1, :], x.shape)
  _, _, stats = _empirical_stats(loss, params, x, y)
  patches = im2col(np.asarray(x), (2, 2), (1, 1), [(0, 0)] * 2, (1, 1))[0]
  a = np.concatenate([patches, np.ones((patches.shape[0], 1))], axis=1)
  g = _output_gradient(conv, params, x, y).reshape(a.shape[0], -1)
  expanded = sum(np.kron(np.outer(a[i], a[i]), np.outer(g[i], g[i])) for i in range(a.shape[0]))
  assert_close(kron(stats['layer']['a_factor'], stats['layer']['g_factor']), expanded,
               rtol=F64, atol=1e-12)
