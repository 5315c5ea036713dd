"""Loss helpers: values against optax, MC cotangents in expectation, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax import _capture
from utils import assert_close


def test_values_match_optax_and_the_gaussian_nll():
  key = jax.random.key(0)
  logits = jax.random.normal(key, (4, 3, 5))
  labels = jax.random.randint(key, (4, 3), 0, 5)
  one_hot = jax.nn.one_hot(labels, 5)
  assert_close(kfax.softmax_cross_entropy(logits, labels),
               optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), rtol=1e-6)
  assert_close(kfax.softmax_cross_entropy(logits, one_hot, label_smoothing=0.1),
               optax.softmax_cross_entropy(logits, optax.smooth_labels(one_hot, 0.1)).mean(),
               rtol=1e-6)
  targets = jax.random.bernoulli(key, 0.5, (4, 3, 5)).astype(jnp.float32)
  assert_close(kfax.sigmoid_binary_cross_entropy(logits, targets),
               optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean(), rtol=1e-6)
  assert_close(kfax.squared_error(logits, 2 * logits), 0.5 * jnp.mean(jnp.sum(logits**2, -1)),
               rtol=1e-6)


Z = jnp.array([[0.5, -1.0, 2.0]])
SOFTMAX, SIGMOID = np.asarray(jax.nn.softmax(Z[0])), np.asarray(jax.nn.sigmoid(Z[0]))


@pytest.mark.parametrize('loss, exact', [
    (lambda z: kfax.softmax_cross_entropy(z, jnp.zeros(1, int)),
     np.diag(SOFTMAX) - np.outer(SOFTMAX, SOFTMAX)),
    (lambda z: kfax.sigmoid_binary_cross_entropy(z, jnp.zeros_like(z)),
     np.diag(SIGMOID * (1 - SIGMOID))),
    (lambda z: kfax.squared_error(z, jnp.zeros_like(z)), np.eye(3)),
])
def test_mc_cotangents_have_the_output_fisher_as_second_moment(loss, exact):
  """E[c cᵀ] for the sampled cotangent c of one example equals the Fisher of its distribution:
  softmax diag(p) - ppᵀ, Bernoulli diag(σ(1-σ)), unit Gaussian I. 20000 draws, 3% Frobenius."""
  trace = _capture._Trace({}, [], mark_outputs=True)
  with _capture._tracing(trace):
    loss(Z)
  ((_, cotangent),) = trace.outputs
  draws = jax.vmap(lambda k: cotangent(k, Z)[0])(jax.random.split(jax.random.key(0), 20000))
  second_moment = np.asarray(draws.T @ draws / draws.shape[0], np.float64)
  assert np.linalg.norm(second_moment - exact) < 0.03 * np.linalg.norm(exact)


def test_input_errors():
  z = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match=r'integer labels must have shape logits.shape\[:-1\]'):
    kfax.softmax_cross_entropy(z, jnp.zeros(3, int))
  with pytest.raises(ValueError, match=r'one-hot or soft labels must have the shape of the logits'):
    kfax.softmax_cross_entropy(z, jnp.zeros((4, 2)))
  with pytest.raises(ValueError, match=r'`label_smoothing` must be in \[0, 1\], got 2'):
    kfax.softmax_cross_entropy(z, jnp.zeros(4, int), label_smoothing=2)
  with pytest.raises(ValueError, match=r'at least 2 axes, got shape \(4,\); add a trailing axis'):
    kfax.squared_error(jnp.zeros(4), jnp.zeros(4))
  with pytest.raises(ValueError, match=r'targets must have the shape of the outputs \(4, 3\)'):
    kfax.sigmoid_binary_cross_entropy(z, jnp.zeros((4, 1)))
