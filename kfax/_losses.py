"""Mean losses that also mark the model's predictive distribution.

Each helper returns the mean over examples of an example's negative log-likelihood, so the Fisher
that K-FAC approximates is the per-example Fisher averaged over the batch. The last axis holds one
example's outputs; every leading axis indexes examples. A boolean `where` of the examples' shape
(`logits.shape[:-1]`) keeps only the examples where it is true, as in optax: the mean is over those,
and the others (padding, ignored tokens) carry no loss and no gradient, even if their outputs or
targets are not finite. Called inside `kfax.value_grad_and_stats`, a helper also tells the capture
which distribution the model output parameterizes and how many examples the mean is over, so that
`fisher="mc"` can sample targets from it, at the kept examples only.
"""

from __future__ import annotations

import math
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


def _check_where(name: str, logits: jax.Array, where: jax.Array | None) -> jax.Array | None:
  """`where` as a boolean array of the examples' shape `logits.shape[:-1]`, or None."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.shape != logits.shape[:-1]:
    raise ValueError(
        f'kfax.{name}: `where` must have the examples\' shape logits.shape[:-1] ='
        f' {logits.shape[:-1]} (one flag per example, not per output), got {where.shape}.'
    )
  if where.dtype != jnp.bool_:
    raise ValueError(
        f'kfax.{name}: `where` must be boolean, got dtype {where.dtype}; e.g. `mask.astype(bool)`.'
    )
  return where


def _examples(logits: jax.Array, where: jax.Array | None) -> jax.Array:
  """How many examples the mean is over, as a float32 scalar: every example position,
  `prod(logits.shape[:-1])`, or the number of True in `where`. At least 1, so that a batch with
  no kept example has loss 0 (and gradient 0) instead of 0 / 0."""
  count = math.prod(logits.shape[:-1]) if where is None else jnp.sum(where, dtype=jnp.float32)
  return jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)


def _kept(z: jax.Array, where: jax.Array | None) -> jax.Array:
  """`z` with the outputs of masked examples replaced by 0: whatever they held (inf, NaN) then
  cannot turn the zero cotangent those examples get into NaN."""
  return z if where is None else jnp.where(where[..., None], z, 0)


def _mean(per_example: jax.Array, where: jax.Array | None, examples: jax.Array) -> jax.Array:
  """Sum of the kept examples' losses over `examples`; masked examples add neither loss nor
  gradient."""
  if where is not None:
    per_example = jnp.where(where, per_example, 0)
  return jnp.sum(per_example) / examples


def _mark(
    logits: jax.Array,
    loss_of_targets: Callable[[jax.Array, jax.Array], jax.Array],
    sample_targets: Callable[[jax.Array, jax.Array], jax.Array],
    where: jax.Array | None,
    examples: jax.Array,
) -> None:
  """Registers `logits` with the active capture. The MC cotangent is d loss(z, y~p(z)) / dz, with
  `loss_of_targets` the same masked mean as the loss: zero at masked examples, and scaled by
  1 / examples like the loss's own gradient. `curvature(z, u)` is that mean's Hessian in z
  applied to u (the Gauss-Newton products of `value_grad_and_stats(...).gauss_newton`)."""

  def sampled_cotangent(key: jax.Array, z: jax.Array) -> jax.Array:
    targets = sample_targets(key, _kept(jax.lax.stop_gradient(z), where))
    return jax.grad(lambda zz: loss_of_targets(zz, targets))(z)

  def curvature(z: jax.Array, u: jax.Array) -> jax.Array:
    # The loss's Hessian in its outputs, which for these canonical-link losses is the output
    # Fisher and does not depend on the targets (zeros stand in for them).
    shape = jax.eval_shape(sample_targets, jax.random.key(0), z)
    targets = jnp.zeros(shape.shape, shape.dtype)
    return jax.jvp(jax.grad(lambda zz: loss_of_targets(zz, targets)), (z,), (u,))[1]

  _capture.mark_output(logits, sampled_cotangent, examples, curvature)


def _sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
  """One class index per row of `logits`, drawn from softmax(logits) by inverting its CDF: one
  uniform per row, where `jax.random.categorical` draws a Gumbel per class (4x slower for a
  (1024, 256) batch on CPU, and the MC backward's largest cost on a byte-level LM)."""
  cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
  u = jax.random.uniform(key, logits.shape[:-1] + (1,), cdf.dtype)
  index = jnp.sum(cdf < u * cdf[..., -1:], axis=-1)  # the first class whose CDF reaches u
  return jnp.minimum(index, logits.shape[-1] - 1)


def _soft_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy against one-hot or soft labels."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
  return -jnp.sum(labels * log_p, axis=-1)


def _integer_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy against integer labels."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
  return -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    where: jax.Array | None = None,
) -> jax.Array:
  """Mean softmax cross-entropy over examples; marks a categorical output for `fisher="mc"`.

  Args:
    logits: `(..., classes)` unnormalized log-probabilities.
    labels: integer class indices of shape `logits.shape[:-1]`, or one-hot / soft labels of shape
      `logits.shape`.
    label_smoothing: mixes the labels with the uniform distribution, `(1 - s) y + s / classes`.
    where: optional boolean of shape `logits.shape[:-1]`: the mean is over the examples where it
      is true; the others (e.g. padding, whose logits and labels may be anything) get no loss, no
      gradient and no sampled target. With no example kept, the loss is 0.

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
  where = _check_where('softmax_cross_entropy', logits, where)
  examples = _examples(logits, where)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  labels = labels.astype(dtype)
  if label_smoothing:
    labels = (1.0 - label_smoothing) * labels + label_smoothing / classes
  _mark(
      logits,
      lambda z, y: _mean(_integer_cross_entropy(_kept(z, where), y), where, examples),
      lambda key, z: _sample_categorical(key, z.astype(dtype)),
      where,
      examples,
  )
  return _mean(_soft_cross_entropy(_kept(logits, where), labels), where, examples)


def _bernoulli_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example sum of the independent Bernoulli NLLs of its outputs. `softplus` (not
  `max(z, 0) + log1p(exp(-|z|))`, whose JAX gradient at z = 0 is 0, not 1/2) keeps the gradient
  sigmoid(z) - label at zero logits too, e.g. a zero-initialized output layer."""
  z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return jnp.sum(jax.nn.softplus(z) - z * labels, axis=-1)


def sigmoid_binary_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, where: jax.Array | None = None
) -> jax.Array:
  """Mean over examples of their outputs' summed sigmoid cross-entropy (independent Bernoullis).

  Args:
    logits: `(..., outputs)` logits; use `(batch, 1)` for one binary output per example.
    labels: targets in [0, 1] of the same shape.
    where: optional boolean of shape `logits.shape[:-1]`: the mean is over the examples where it
      is true; the others get no loss, no gradient and no sampled target. With no example kept,
      the loss is 0.

  Returns:
    The scalar mean loss.
  """
  _check_logits('sigmoid_binary_cross_entropy', logits, labels)
  where = _check_where('sigmoid_binary_cross_entropy', logits, where)
  examples = _examples(logits, where)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  loss = lambda z, y: _mean(_bernoulli_nll(_kept(z, where), y), where, examples)
  _mark(
      logits,
      loss,
      lambda key, z: jax.random.bernoulli(key, jax.nn.sigmoid(z.astype(dtype))).astype(dtype),
      where,
      examples,
  )
  return loss(logits, labels.astype(dtype))


def _gaussian_nll(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example `0.5 * ||prediction - target||^2`."""
  diff = predictions.astype(jnp.promote_types(predictions.dtype, jnp.float32)) - targets
  return 0.5 * jnp.sum(diff**2, axis=-1)


def squared_error(
    predictions: jax.Array, targets: jax.Array, *, where: jax.Array | None = None
) -> jax.Array:
  """Mean over examples of `0.5 * ||prediction - target||^2` (unit-variance Gaussian NLL).

  Args:
    predictions: `(..., outputs)` predicted means; use `(batch, 1)` for scalar regression.
    targets: targets of the same shape.
    where: optional boolean of shape `predictions.shape[:-1]`: the mean is over the examples where
      it is true; the others get no loss, no gradient and no sampled target. With no example kept,
      the loss is 0.

  Returns:
    The scalar mean loss.
  """
  _check_logits('squared_error', predictions, targets)
  where = _check_where('squared_error', predictions, where)
  examples = _examples(predictions, where)
  dtype = jnp.promote_types(predictions.dtype, jnp.float32)
  loss = lambda z, y: _mean(_gaussian_nll(_kept(z, where), y), where, examples)
  _mark(
      predictions,
      loss,
      lambda key, z: z.astype(dtype) + jax.random.normal(key, z.shape, dtype),
      where,
      examples,
  )
  return loss(predictions, targets.astype(dtype))
