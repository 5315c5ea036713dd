"""`grad_fn.gauss_newton` and `kfax.quadratic_model`: Gauss-Newton products against dense
Jacobians, the update against the quadratic model it minimizes, the damping rule, learning
without a learning rate, and input errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import kfax
from utils import assert_close


class TwoHeads(nn.Module):
  """A tanh MLP with a softmax head and a sigmoid head: two marked outputs."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(6)(x))
    return nn.Dense(4)(h), nn.Dense(3)(h)


MODEL = TwoHeads()


def _loss(params, x, y, where):
  logits, bits = MODEL.apply({'params': params}, x)
  return (kfax.softmax_cross_entropy(logits, y, where=where)
          + kfax.sigmoid_binary_cross_entropy(bits, (x[:, :3] > 0).astype(x.dtype)))


def _params(x):
  """Initial parameters in the default float dtype (float64 under the x64 fixture)."""
  params = MODEL.init(jax.random.key(2), x)['params']
  return jax.tree.map(lambda a: a.astype(jnp.asarray(1.0).dtype), params)


def _batch(n=10, seed=0):
  x = jax.random.normal(jax.random.key(seed), (n, 5))
  y = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 4)
  where = jnp.arange(n) % 4 != 1
  return x, y, where


def _dense_gauss_newton(params, x, where):
  """Σ Jᵀ H J in float64 from `jax.jacobian`: softmax H = (diag p - ppᵀ) / kept at kept rows,
  sigmoid H = diag σ(1-σ) / n."""
  flat, unravel = ravel_pytree(params)
  heads = lambda f: MODEL.apply({'params': unravel(f)}, x)
  j_soft, j_sig = (np.asarray(j) for j in jax.jacobian(heads)(flat))
  logits, bits = (np.asarray(z) for z in heads(flat))
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  kept, n = np.asarray(where), x.shape[0]
  h_soft = np.stack([np.diag(q) - np.outer(q, q) for q in p]) * kept[:, None, None] / kept.sum()
  s = 1 / (1 + np.exp(-bits))
  h_sig = np.stack([np.diag(r * (1 - r)) for r in s]) / n
  return (np.einsum('nip,nij,njq->pq', j_soft, h_soft, j_soft)
          + np.einsum('nip,nij,njq->pq', j_sig, h_sig, j_sig)), unravel


def test_gauss_newton_products_equal_the_dense_gauss_newton_matrix(x64):
  """Two marked outputs (softmax with a mask, sigmoid), three tangents: the 3x3 Gram matrix
  equals vᵢᵀ G vⱼ with G from dense Jacobians, in float64."""
  x, y, where = _batch()
  params = _params(x)
  grad_fn = kfax.value_grad_and_stats(_loss)
  dense, unravel = _dense_gauss_newton(params, x, where)
  vectors = [np.asarray(jax.random.normal(jax.random.key(10 + i), (dense.shape[0],)))
             for i in range(3)]
  gram = grad_fn.gauss_newton(params, x, y, where)([unravel(v) for v in vectors])
  want = np.array([[a @ dense @ b for b in vectors] for a in vectors])
  assert_close(gram, want, rtol=1e-10, atol=1e-12)


def _stepper(tx, grad_fn):
  """One update, jitted once (eager op-by-op costs seconds):
  (params, state, batch, key) -> (grads, updates, new state)."""

  @jax.jit
  def step(params, state, batch, key):
    _, grads, stats = grad_fn(params, *batch, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats,
                               gauss_newton=grad_fn.gauss_newton(params, *batch),
                               loss=lambda p: _loss(p, *batch))
    return grads, updates, state

  return step


def test_the_update_minimizes_the_damped_quadratic_model(x64):
  """The first update has μ = 0. On the third (the previous update δ₀ ≠ 0), u = αΔ + μδ₀ with Δ the negated K-FAC
  direction; with G dense (float64) and λ the state's damping before the update, the model's
  gradient (G + λI) u + g is orthogonal to Δ and δ₀, so (α, μ) minimizes it on their span:
  |(model gradient)·v| is under 1e-5 of |g·v| (the model's gradient at 0), for v = Δ, δ₀; the
  coefficients are solved in float32."""
  x, y, where = _batch(16)
  params = _params(x)
  grad_fn = kfax.value_grad_and_stats(_loss)
  kfac = kfax.kfac(grad_fn.layers(params, x, y, where), damping=1e-2, norm_constraint=None)
  tx = kfax.quadratic_model(kfac, initial_damping=0.5)
  state, step = tx.init(params), _stepper(tx, grad_fn)
  for i in range(3):
    before = state
    grads, updates, state = step(params, state, (x, y, where), jax.random.key(i))
    if i == 0:  # no previous update: no momentum
      assert float(state.momentum) == 0 and float(state.learning_rate) > 0
    if i < 2:
      params = optax.apply_updates(params, updates)
  flat = lambda t: np.asarray(ravel_pytree(t)[0], np.float64)
  direction, _ = kfac.update(grads, before.inner, params, stats=None)
  delta, previous, u, g = -flat(direction), flat(before.previous), flat(updates), flat(grads)
  assert np.linalg.norm(previous) > 0 and float(state.momentum) != 0
  assert_close(u, float(state.learning_rate) * delta + float(state.momentum) * previous,
               rtol=1e-9, atol=1e-12)
  dense, _ = _dense_gauss_newton(params, x, where)
  residual = (dense + float(before.damping) * np.eye(len(u))) @ u + g
  for v in (delta, previous):
    assert abs(residual @ v) < 1e-5 * abs(g @ v), (residual @ v, g @ v)


@pytest.mark.parametrize('reduction, factor', [(-0.9, 0.5), (-0.5, 1.0), (-0.1, 2.0), (0.3, 2.0),
                                               (np.nan, 2.0)])
def test_damping_follows_the_levenberg_marquardt_rule(reduction, factor):
  """ρ = reduction / predicted (predicted -1): > 3/4 → λω, < 1/4 or NaN → λ/ω, else λ."""
  from kfax._quadratic import adapt_damping
  got = adapt_damping(jnp.float32(0.2), jnp.float32(reduction), jnp.float32(-1.0), 0.5)
  assert float(got) == pytest.approx(0.2 * factor)


def test_damping_adapts_on_the_schedule_from_the_actual_reduction():
  """With adapt_every 2, λ changes on updates 0 and 2 only, by the rule applied to the loss
  before and after the update and the model's predicted reduction ½ bᵀ(α, μ)."""
  x, y, where = _batch()
  params = _params(x)
  grad_fn = kfax.value_grad_and_stats(_loss)
  kfac = kfax.kfac(grad_fn.layers(params, x, y, where), norm_constraint=None)
  tx = kfax.quadratic_model(kfac, initial_damping=1.0, adapt_every=2, damping_decay=0.5)
  state, step = tx.init(params), _stepper(tx, grad_fn)
  for i in range(3):
    before = state
    grads, updates, state = step(params, state, (x, y, where), jax.random.key(i))
    new = optax.apply_updates(params, updates)
    if i % 2:
      assert float(state.damping) == float(before.damping)
    else:
      flat = lambda t: np.asarray(ravel_pytree(t)[0], np.float64)
      delta = flat(kfac.update(grads, before.inner, params, stats=None)[0])
      b = -flat(grads) @ delta, flat(grads) @ flat(before.previous)
      predicted = 0.5 * (float(state.learning_rate) * b[0] + float(state.momentum) * b[1])
      rho = (float(_loss(new, x, y, where)) - float(_loss(params, x, y, where))) / predicted
      factor = 0.5 if rho > 0.75 else 2.0 if rho < 0.25 else 1.0
      assert float(state.damping) == pytest.approx(float(before.damping) * factor, rel=1e-5)
    params = new


def test_learns_without_a_learning_rate():
  """A tanh MLP regressing a linear map of inputs whose scales span 100x: 20 updates of the
  quadratic model around K-FAC bring the loss over the 20 batches below a quarter of its start;
  SGD with momentum 0.9 at its best of lr 0.01, 0.03 and 0.1 (the same batches) stays above."""
  scale = jnp.logspace(-1.5, 0.5, 8)
  xs = jax.random.normal(jax.random.key(0), (20, 64, 8)) * scale[None, None]
  ys = xs @ (jax.random.normal(jax.random.key(1), (8, 3)) / scale[:, None])
  model = nn.Sequential([nn.Dense(16), nn.tanh, nn.Dense(3)])
  params = model.init(jax.random.key(2), xs[0])['params']
  loss_fn = lambda p, x, y: kfax.squared_error(model.apply({'params': p}, x), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn)
  qm = kfax.quadratic_model(kfax.kfac(grad_fn.layers(params, xs[0], ys[0]),
                                      norm_constraint=None))

  @jax.jit
  def qm_step(p, s, x, y, key):
    _, grads, stats = grad_fn(p, x, y, rng=key)
    u, s = qm.update(grads, s, p, stats=stats, gauss_newton=grad_fn.gauss_newton(p, x, y),
                     loss=lambda q: loss_fn(q, x, y))
    return optax.apply_updates(p, u), s

  def sgd_run(lr):
    sgd = optax.sgd(lr, momentum=0.9)
    step = jax.jit(lambda p, s, x, y: sgd.update(jax.grad(loss_fn)(p, x, y), s, p))
    p, s = params, sgd.init(params)
    for x, y in zip(xs, ys):
      u, s = step(p, s, x, y)
      p = optax.apply_updates(p, u)
    return p

  mean_loss = lambda p: float(jnp.mean(jax.vmap(lambda x, y: loss_fn(p, x, y))(xs, ys)))
  p, s = params, qm.init(params)
  for i, (x, y) in enumerate(zip(xs, ys)):
    p, s = qm_step(p, s, x, y, jax.random.key(i))
  start, sgd_best = mean_loss(params), min(mean_loss(sgd_run(lr)) for lr in (0.01, 0.03, 0.1))
  assert mean_loss(p) < start / 4 < sgd_best, (start, mean_loss(p), sgd_best)


def test_input_errors():
  x, y, where = _batch()
  params = _params(x)
  grad_fn = kfax.value_grad_and_stats(_loss)
  tx = kfax.quadratic_model(kfax.kfac(grad_fn.layers(params, x, y, where)))
  _, grads, stats = grad_fn(params, x, y, where, rng=jax.random.key(0))
  with pytest.raises(TypeError, match=r'needs the params, `gauss_newton=grad_fn.gauss_newton'):
    tx.update(grads, tx.init(params), params, stats=stats)
  plain = kfax.value_grad_and_stats(lambda p: jnp.sum(MODEL.apply({'params': p}, x)[0] ** 2),
                                    fisher='empirical')
  with pytest.raises(ValueError, match=r'gauss_newton needs the loss to be built from'):
    plain.gauss_newton(params)
  with_rng = kfax.value_grad_and_stats(lambda p, x, y, where, rng: _loss(p, x, y, where))
  with pytest.raises(ValueError, match=r"loss takes an `rng` \(dropout\); pass the rng="):
    with_rng.gauss_newton(params, x, y, where)
  gram = with_rng.gauss_newton(params, x, y, where, rng=jax.random.key(0))([grads])
  assert_close(gram, grad_fn.gauss_newton(params, x, y, where)([grads]), rtol=1e-6)
  kfac = kfax.kfac(grad_fn.layers(params, x, y, where))
  for bad, match in [({'initial_damping': 0.0}, 'initial_damping` must be > 0'),
                     ({'adapt_every': 0}, 'adapt_every` must be an integer >= 1'),
                     ({'damping_decay': 1.0}, r'damping_decay` must be in \(0, 1\)')]:
    with pytest.raises(ValueError, match=match):
      kfax.quadratic_model(kfac, **bad)


def test_nnx_optimizer_update_equals_the_linen_twin():
  """An NNX MLP and its linen twin with equal weights: equal Gram matrices of their gradients,
  and two `nnx.Optimizer` updates of `quadratic_model(kfac)` (its `loss` of the parameters'
  `nnx.State`) move the weights as the linen updates do."""
  from flax import nnx

  class Twin(nnx.Module):
    def __init__(self, rngs):
      self.a, self.b = nnx.Linear(5, 6, rngs=rngs), nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
      return self.b(jnp.tanh(self.a(x)))

  model = Twin(nnx.Rngs(0))
  x, y, _ = _batch()
  nnx_loss = lambda m, x, y: kfax.softmax_cross_entropy(m(x), y)
  nnx_fn = kfax.value_grad_and_stats(nnx_loss)
  linen = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(4)])
  as_linen = lambda m: {f'layers_{i}': {'kernel': layer.kernel[...], 'bias': layer.bias[...]}
                        for i, layer in ((0, m.a), (2, m.b))}
  params = as_linen(model)
  linen_loss = lambda p, x, y: kfax.softmax_cross_entropy(linen.apply({'params': p}, x), y)
  linen_fn = kfax.value_grad_and_stats(linen_loss)

  _, nnx_grads, _ = nnx_fn(model, x, y, rng=jax.random.key(1))
  _, linen_grads, _ = linen_fn(params, x, y, rng=jax.random.key(1))
  other, other_nnx = (jax.tree.map(jnp.cos, g) for g in (linen_grads, nnx_grads))
  assert_close(nnx_fn.gauss_newton(model, x, y)([nnx_grads, other_nnx]),
               linen_fn.gauss_newton(params, x, y)([linen_grads, other]), rtol=1e-5, atol=1e-9)

  make = lambda table: kfax.quadratic_model(kfax.kfac(table, norm_constraint=None),
                                            initial_damping=0.5)
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  optimizer = nnx.Optimizer(model, make(nnx_fn.layers(model, x, y)), wrt=nnx.Param)
  tx = make(linen_fn.layers(params, x, y))
  state = tx.init(params)
  for i in range(2):
    _, grads, stats = nnx_fn(model, x, y, rng=jax.random.key(i))
    optimizer.update(model, grads, stats=stats, gauss_newton=nnx_fn.gauss_newton(model, x, y),
                     loss=lambda p: nnx_loss(nnx.merge(graphdef, p, rest), x, y))
    _, grads, stats = linen_fn(params, x, y, rng=jax.random.key(i))
    updates, state = tx.update(grads, state, params, stats=stats,
                               gauss_newton=linen_fn.gauss_newton(params, x, y),
                               loss=lambda p: linen_loss(p, x, y))
    params = optax.apply_updates(params, updates)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4, atol=1e-6), as_linen(model), params)
