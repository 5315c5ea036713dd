"""Mean losses that also mark the model's predictive distribution.

Each helper returns the mean over examples of an example's negative log-likelihood, so the Fisher
that K-FAC approximates is the per-example Fisher averaged over the batch. The last axis holds one
example's outputs; every leading axis indexes examples. Called inside
`kfax.value_grad_and_stats`, a helper also tells the capture which distribution the model output
parameterizes, so that `fisher="mc"` can sample targets from it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kfax import _capture


def _check_logits(name: str, logits: jax.Array, targets: jax.Array, *, min_ndim: int = 2) -> None:
  if logits.ndim < min_ndim:
    raise ValueError(
        f'kfax.{name}: expected outputs of shape (..., outputs) with at least {min_ndim} axes, got'
        f' shape {logits.shape}; add a trailing axis, e.g. `x[:, None]`.'
    )
  if targets.shape != logits.shape:
    raise ValueError(
        f'kfax.{name}: targets must have the shape of the outputs {logits.shape}, got'
        f' {targets.shape}.'
    )


def _mark(logits: jax.Array, loss_of_targets: Callable, sample_targets: Callable) -> None:
  """Registers `logits` with the active capture: the MC cotangent is d loss(z, y~p(z)) / dz."""

  def sampled_cotangent(key: jax.Array, z: jax.Array) -> jax.Array:
    targets = sample_targets(key, jax.lax.stop_gradient(z))
    return jax.grad(lambda zz: loss_of_targets(zz, targets))(z)

  _capture.mark_output(logits, sampled_cotangent)


def _integer_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  log_p = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
  return -jnp.mean(jnp.take_along_axis(log_p, labels[..., None], axis=-1))


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean softmax cross-entropy over examples; marks a categorical output for `fisher="mc"`.

  Args:
    logits: `(..., classes)` unnormalized log-probabilities.
    labels: integer class indices of shape `logits.shape[:-1]`, or one-hot / soft labels of shape
      `logits.shape`.
    label_smoothing: mixes the labels with the uniform distribution, `(1 - s) y + s / classes`.

  Returns:
    The scalar mean loss (float32 or wider).
  """
  if not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(
        f'kfax.softmax_cross_entropy: `label_smoothing` must be in [0, 1], got {label_smoothing}.'
    )
  if logits.ndim < 1:
    raise ValueError('kfax.softmax_cross_entropy: logits must have a class axis, got a scalar.')
  classes = logits.shape[-1]
  if jnp.issubdtype(labels.dtype, jnp.integer):
    if labels.shape != logits.shape[:-1]:
      raise ValueError(
          'kfax.softmax_cross_entropy: integer labels must have shape logits.shape[:-1] ='
          f' {logits.shape[:-1]}, got {labels.shape}.'
      )
    labels = jax.nn.one_hot(labels, classes)
  elif labels.shape != logits.shape:
    raise ValueError(
        'kfax.softmax_cross_entropy: one-hot or soft labels must have the shape of the logits'
        f' {logits.shape}, got {labels.shape}.'
    )
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  labels = labels.astype(dtype)
  if label_smoothing:
    labels = (1.0 - label_smoothing) * labels + label_smoothing / classes
  _mark(
      logits,
      _integer_cross_entropy,
      lambda key, z: jax.random.categorical(key, z.astype(dtype)),
  )
  log_p = jax.nn.log_softmax(logits.astype(dtype))
  return -jnp.mean(jnp.sum(labels * log_p, axis=-1))


def _bernoulli_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  per_unit = jnp.maximum(z, 0) - z * labels + jnp.log1p(jnp.exp(-jnp.abs(z)))
  return jnp.mean(jnp.sum(per_unit, axis=-1))


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over examples of the summed sigmoid cross-entropy of their outputs (independent Bernoullis).

  Args:
    logits: `(..., outputs)` logits; use `(batch, 1)` for one binary output per example.
    labels: targets in [0, 1] of the same shape.

  Returns:
    The scalar mean loss.
  """
  _check_logits('sigmoid_binary_cross_entropy', logits, labels)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  _mark(
      logits,
      _bernoulli_nll,
      lambda key, z: jax.random.bernoulli(key, jax.nn.sigmoid(z.astype(dtype))).astype(dtype),
  )
  return _bernoulli_nll(logits, labels.astype(dtype))


def _gaussian_nll(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  diff = predictions.astype(jnp.promote_types(predictions.dtype, jnp.float32)) - targets
  return 0.5 * jnp.mean(jnp.sum(diff**2, axis=-1))


def squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean over examples of `0.5 * ||prediction - target||^2` (unit-variance Gaussian NLL).

  Args:
    predictions: `(..., outputs)` predicted means; use `(batch, 1)` for scalar regression.
    targets: targets of the same shape.

  Returns:
    The scalar mean loss.
  """
  _check_logits('squared_error', predictions, targets)
  dtype = jnp.promote_types(predictions.dtype, jnp.float32)
  _mark(
      predictions,
      _gaussian_nll,
      lambda key, z: z.astype(dtype) + jax.random.normal(key, z.shape, dtype),
  )
  return _gaussian_nll(predictions, targets.astype(dtype))
