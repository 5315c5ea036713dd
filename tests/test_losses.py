"""Loss helpers: values against optax, masking with `where`, MC cotangents in expectation and
what they tell the capture, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfax
from kfax import _capture
from utils import assert_close


CURVATURES = []


@pytest.fixture(autouse=True)
def marks(monkeypatch):
  """Records every `_capture.mark_output(logits, sampled_cotangent, examples, curvature)` call
  as a tuple `(logits, sampled_cotangent, examples)`, checking the contract: `examples` is a
  float32 scalar. `curvature` goes to `CURVATURES`. Autouse, so that the losses are tested
  independently of the capture."""
  calls = []
  CURVATURES.clear()

  def mark_output(logits, sampled_cotangent, examples, curvature):
    assert callable(sampled_cotangent) and callable(curvature)
    assert jnp.shape(examples) == () and jnp.result_type(examples) == jnp.float32
    calls.append((logits, sampled_cotangent, examples))
    CURVATURES.append(curvature)

  monkeypatch.setattr(_capture, 'mark_output', mark_output)
  return calls


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


def test_sigmoid_gradient_at_zero_logits_is_one_half_minus_the_label():
  """A zero-initialized output layer gives z = 0 exactly, where `max(z, 0)` and `|z|` have
  subgradient 0 in JAX; the loss's gradient must still be sigmoid(0) - y."""
  grads = jax.grad(kfax.sigmoid_binary_cross_entropy)(jnp.zeros((2, 1)), jnp.array([[0.0], [1.0]]))
  np.testing.assert_array_equal(grads, [[0.25], [-0.25]])  # (1/2 - y) / 2 examples


WHERE = jnp.array([[True, False, True], [False, False, True], [True, True, False],
                   [False, True, True]])  # 7 of 12 kept


def test_masked_values_match_optax_where_and_numpy_and_count_the_kept_examples(marks):
  """The loss is the mean over the kept examples (optax's `where=` summed over the kept count, or
  a numpy masked mean); outputs that are not finite at masked examples change nothing; under
  `jit` too; and the capture is told the mean is over 7 examples."""
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  logits = jax.random.normal(k1, (4, 3, 5))
  labels = jax.random.randint(k2, (4, 3), 0, 5)
  targets = jax.random.bernoulli(k3, 0.5, (4, 3, 5)).astype(jnp.float32)
  keep = np.asarray(WHERE)
  garbage = jnp.where(WHERE[..., None], logits, jnp.nan)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=WHERE).sum() / 7
  smooth = optax.smooth_labels(jax.nn.one_hot(labels, 5), 0.1)
  ce_smooth = optax.softmax_cross_entropy(logits, smooth, where=WHERE).sum() / 7
  bce = np.asarray(optax.sigmoid_binary_cross_entropy(logits, targets)).sum(-1)[keep].mean()
  se = (0.5 * np.asarray(logits - targets) ** 2).sum(-1)[keep].mean()
  cases = [
      (lambda z, w: kfax.softmax_cross_entropy(z, labels, where=w), ce),
      (lambda z, w: kfax.softmax_cross_entropy(z, smooth, where=w), ce_smooth),
      (lambda z, w: kfax.softmax_cross_entropy(z, jax.nn.one_hot(labels, 5), label_smoothing=0.1,
                                               where=w), ce_smooth),
      (lambda z, w: kfax.sigmoid_binary_cross_entropy(z, targets, where=w), bce),
      (lambda z, w: kfax.squared_error(z, targets, where=w), se),
  ]
  for loss, reference in cases:
    for z in (logits, garbage):
      marks.clear()
      assert_close(loss(z, WHERE), reference, rtol=1e-6)
      ((marked, _, examples),) = marks
      assert marked is z and float(examples) == 7.0
    assert_close(jax.jit(loss)(garbage, WHERE), reference, rtol=1e-6)
    marks.clear()
    loss(logits, None)
    assert float(marks[0][2]) == 12.0  # no `where`: every example position


LABELS = {
    'integer': jnp.arange(12).reshape(4, 3) % 5,
    'soft': jax.nn.softmax(jnp.arange(60.0).reshape(4, 3, 5) / 7),
    'binary': jnp.full((4, 3, 5), 0.3),
}


@pytest.mark.parametrize('loss, labels, padding', [
    (kfax.softmax_cross_entropy, 'integer', -1),
    (kfax.softmax_cross_entropy, 'soft', jnp.nan),
    (kfax.sigmoid_binary_cross_entropy, 'binary', jnp.nan),
    (kfax.squared_error, 'binary', jnp.nan),
], ids=['integer', 'soft', 'sigmoid', 'squared'])
def test_masked_examples_get_exactly_zero_gradient(loss, labels, padding):
  """Gradients at masked examples are exactly 0 even when their outputs are inf / NaN and their
  labels are padding (-1) or NaN; at kept ones they are those of the loss on the kept examples
  alone (a mean over the same 7 examples)."""
  z = jax.random.normal(jax.random.key(2), (4, 3, 5))
  z = z.at[0, 1].set(jnp.inf).at[1, 0].set(jnp.nan).at[2, 2, 0].set(-jnp.inf)
  keep = np.asarray(WHERE)
  labels = LABELS[labels]
  padded = jnp.where(WHERE.reshape(WHERE.shape + (1,) * (labels.ndim - 2)), labels, padding)
  grads = np.asarray(jax.grad(lambda z: loss(z, padded, where=WHERE))(z))
  assert np.all(grads[~keep] == 0) and np.all(np.isfinite(grads))
  reference = jax.grad(loss)(z[keep][None], labels[keep][None])  # (1, 7, 5): kept ones only
  assert_close(grads[keep], np.asarray(reference)[0], rtol=1e-6)


@pytest.mark.parametrize('loss', [
    lambda z, w: kfax.softmax_cross_entropy(z, jnp.zeros(z.shape[:-1], int), where=w),
    lambda z, w: kfax.sigmoid_binary_cross_entropy(z, jnp.zeros_like(z), where=w),
    lambda z, w: kfax.squared_error(z, jnp.zeros_like(z), where=w),
], ids=['softmax', 'sigmoid', 'squared'])
def test_all_masked_is_zero_loss_zero_gradient_and_one_example(loss, marks):
  z = jnp.full((2, 3), jnp.nan)
  where = jnp.zeros(2, bool)
  value, grads = jax.value_and_grad(loss)(z, where)
  assert float(value) == 0.0 and np.all(np.asarray(grads) == 0)
  ((_, cotangent, examples), *_) = marks
  assert float(examples) == 1.0  # at least 1: no 0 / 0
  assert np.all(np.asarray(cotangent(jax.random.key(0), z)) == 0)


Z = jnp.array([[0.5, -1.0, 2.0]])
SOFTMAX, SIGMOID = np.asarray(jax.nn.softmax(Z[0])), np.asarray(jax.nn.sigmoid(Z[0]))


@pytest.mark.parametrize('loss, exact', [
    (lambda z: kfax.softmax_cross_entropy(z, jnp.zeros(1, int)),
     np.diag(SOFTMAX) - np.outer(SOFTMAX, SOFTMAX)),
    (lambda z: kfax.sigmoid_binary_cross_entropy(z, jnp.zeros_like(z)),
     np.diag(SIGMOID * (1 - SIGMOID))),
    (lambda z: kfax.squared_error(z, jnp.zeros_like(z)), np.eye(3)),
])
def test_mc_cotangents_have_the_output_fisher_as_second_moment(loss, exact, marks):
  """E[c cᵀ] for the sampled cotangent c of one example equals the Fisher of its distribution:
  softmax diag(p) - ppᵀ, Bernoulli diag(σ(1-σ)), unit Gaussian I. 20000 draws, 3% Frobenius."""
  loss(Z)
  ((_, cotangent, examples),) = marks
  assert float(examples) == 1.0
  draws = jax.vmap(lambda k: cotangent(k, Z)[0])(jax.random.split(jax.random.key(0), 20000))
  second_moment = np.asarray(draws.T @ draws / draws.shape[0], np.float64)
  assert np.linalg.norm(second_moment - exact) < 0.03 * np.linalg.norm(exact)


def test_sampled_classes_follow_the_softmax():
  """`_sample_categorical` (inverse CDF) against softmax probabilities, 200000 draws per row: each
  frequency within 5 standard errors; a class of probability 0 (logit -1e30) is never drawn, nor
  is any class but the one that holds all the mass (logits 0 and 1e4 in float32)."""
  from kfax import _losses
  z = jnp.array([[0.5, -1.0, 2.0, -1e30], [0.0, 0.0, 0.0, 0.0], [0.0, 1e4, 0.0, 0.0]])
  draws = np.asarray(_losses._sample_categorical(
      jax.random.key(0), jnp.broadcast_to(z, (200_000,) + z.shape)))
  freq = np.stack([np.bincount(draws[:, i], minlength=4) for i in range(3)]) / draws.shape[0]
  p = np.asarray(jax.nn.softmax(z, -1), np.float64)
  stderr = np.sqrt(p * (1 - p) / draws.shape[0])
  assert np.all(np.abs(freq - p) <= 5 * stderr + 1e-12), (freq, p)
  assert freq[0, 3] == 0 and freq[2, 1] == 1


def _softmax_fisher(z):
  p = np.asarray(jax.nn.softmax(z))
  return np.diag(p) - np.outer(p, p)


def _sigmoid_fisher(z):
  s = np.asarray(jax.nn.sigmoid(z))
  return np.diag(s * (1 - s))


@pytest.mark.parametrize('loss, fisher', [
    (lambda z, w: kfax.softmax_cross_entropy(z, jnp.zeros(z.shape[:-1], int), where=w),
     _softmax_fisher),
    (lambda z, w: kfax.sigmoid_binary_cross_entropy(z, jnp.zeros_like(z), where=w),
     _sigmoid_fisher),
    (lambda z, w: kfax.squared_error(z, jnp.zeros_like(z), where=w), lambda z: np.eye(3)),
], ids=['softmax', 'sigmoid', 'squared'])
def test_masked_mc_cotangents_are_zero_where_masked_and_have_the_fisher_elsewhere(
    loss, fisher, marks, x64):
  """With 3 of 4 examples kept (the masked one NaN), every sampled cotangent is exactly 0 at the
  masked example; at a kept one, c = (per-example cotangent) / examples, so examples² E[c cᵀ] is
  that example's output Fisher. Float64, 20000 draws, 3% Frobenius per example."""
  z = jnp.array([[0.5, -1.0, 2.0], [jnp.nan] * 3, [1.5, 0.0, -0.5], [-2.0, 1.0, 0.3]])
  where = jnp.array([True, False, True, True])
  loss(z, where)
  ((_, cotangent, examples),) = marks
  assert float(examples) == 3.0
  draws = np.asarray(jax.vmap(lambda k: cotangent(k, z))(jax.random.split(jax.random.key(0),
                                                                            20000)))
  assert draws.dtype == np.float64 and np.all(draws[:, 1] == 0)
  for i in (0, 2, 3):
    second_moment = float(examples) ** 2 * draws[:, i].T @ draws[:, i] / draws.shape[0]
    exact = fisher(np.asarray(z[i]))
    assert np.linalg.norm(second_moment - exact) < 0.03 * np.linalg.norm(exact), i


@pytest.mark.parametrize('loss, fisher', [
    (lambda z, w: kfax.softmax_cross_entropy(z, jnp.ones(z.shape[:-1], int), where=w),
     _softmax_fisher),
    (lambda z, w: kfax.sigmoid_binary_cross_entropy(z, jnp.full(z.shape, 0.3), where=w),
     _sigmoid_fisher),
    (lambda z, w: kfax.squared_error(z, jnp.full(z.shape, 2.0), where=w), lambda z: np.eye(3)),
], ids=['softmax', 'sigmoid', 'squared'])
def test_curvature_is_the_hessian_of_the_mean_loss_in_the_outputs(loss, fisher, marks, x64):
  """`curvature(z, u)` = (the loss's Hessian in z) u, in float64 against `jax.hessian` of the
  loss itself and against the output Fisher / examples at kept rows (0 at the masked one)."""
  z = jnp.array([[0.5, -1.0, 2.0], [0.1, 0.2, 0.3], [1.5, 0.0, -0.5], [-2.0, 1.0, 0.3]])
  where = jnp.array([True, False, True, True])
  loss(z, where)
  (curvature,) = CURVATURES
  hessian = np.asarray(jax.hessian(lambda zz: loss(zz, where))(z)).reshape(12, 12)
  basis = np.eye(12).reshape(12, 4, 3)
  got = np.stack([np.asarray(curvature(z, jnp.asarray(u))).ravel() for u in basis], axis=1)
  assert_close(got, hessian, atol=1e-12)
  expect = np.zeros((12, 12))
  for i in (0, 2, 3):
    expect[3 * i:3 * i + 3, 3 * i:3 * i + 3] = fisher(np.asarray(z[i])) / 3.0
  assert_close(got, expect, atol=1e-12)


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


@pytest.mark.parametrize('name, loss', [
    ('softmax_cross_entropy', lambda z, w: kfax.softmax_cross_entropy(z, jnp.zeros(4, int),
                                                                      where=w)),
    ('sigmoid_binary_cross_entropy',
     lambda z, w: kfax.sigmoid_binary_cross_entropy(z, jnp.zeros_like(z), where=w)),
    ('squared_error', lambda z, w: kfax.squared_error(z, jnp.zeros_like(z), where=w)),
])
def test_where_errors(name, loss):
  z = jnp.zeros((4, 3))
  shape = rf"kfax\.{name}: `where` must have the examples' shape logits.shape\[:-1\] = \(4,\)"
  with pytest.raises(ValueError, match=shape + r'.*got \(4, 3\)'):
    loss(z, jnp.ones((4, 3), bool))  # per output, as optax also allows: not here
  with pytest.raises(ValueError, match=shape + r'.*got \(3,\)'):
    loss(z, jnp.ones(3, bool))
  with pytest.raises(ValueError, match=rf'kfax\.{name}: `where` must be boolean, got dtype float'):
    loss(z, jnp.ones(4))
