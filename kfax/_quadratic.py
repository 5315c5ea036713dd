"""`kfax.quadratic_model`: the learning rate and momentum that minimize the local quadratic model
(Martens & Grosse 2015, section 7), around any preconditioner."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class QuadraticModelState(NamedTuple):
  """The preconditioner's state and the last update (δ₀, the momentum direction)."""

  count: jax.Array  # shape=(), int32: updates so far
  inner: Any
  previous: Any  # the last update, shaped like the params; zeros before the first
  damping: jax.Array  # shape=(), float32: λ of the model, adapted by the reduction ratio
  learning_rate: jax.Array  # shape=(): the α of the last update (for logging)
  momentum: jax.Array  # shape=(): the μ of the last update


def _tree_vdot(a: Any, b: Any) -> jax.Array:
  """optax's `tree_vdot` in float32 (bfloat16 updates would round the model's coefficients)."""
  f32 = lambda t: optax.tree_utils.tree_cast(t, jnp.float32)
  return optax.tree_utils.tree_vdot(f32(a), f32(b))


def coefficients(gram: jax.Array, gradient_dots: jax.Array) -> jax.Array:
  """`(α, μ)` minimizing `½ cᵀ M c + bᵀ c` over c = (α, μ), M the damped 2x2 Gram matrix of
  (Δ, δ₀) and b their inner products with the gradient. Without a previous update (δ₀ = 0,
  M₁₁ = 0) μ = 0 and α = -b₀ / M₀₀; a non-positive or non-finite model gives (0, 0)."""
  (m00, m01), (_, m11) = gram
  b0, b1 = gradient_dots
  det = m00 * m11 - m01 * m01
  two = jnp.stack([(-m11 * b0 + m01 * b1) / det, (m01 * b0 - m00 * b1) / det])
  one = jnp.stack([-b0 / m00, jnp.zeros_like(b0)])
  out = jnp.where((m11 > 0) & (det > 1e-6 * m00 * m11), two, one)
  return jnp.where(jnp.all(jnp.isfinite(out)) & (m00 > 0), out, jnp.zeros_like(out))


def adapt_damping(damping: jax.Array, reduction: jax.Array, predicted: jax.Array,
                  decay: float) -> jax.Array:
  """Levenberg-Marquardt: ρ = (actual reduction) / (the model's); λ·decay if ρ > 3/4, λ/decay
  if ρ < 1/4 (or the loss is not finite), else λ; kept in [1e-8, 1e8]."""
  rho = reduction / predicted
  factor = jnp.where(rho > 0.75, decay, jnp.where((rho < 0.25) | ~jnp.isfinite(rho), 1 / decay,
                                                  1.0))
  return jnp.clip(damping * factor, 1e-8, 1e8)


def quadratic_model(
    preconditioner: optax.GradientTransformation,
    initial_damping: float = 1.0,
    adapt_every: int = 5,
    damping_decay: float = (19 / 20) ** 5,
    axis_name: str | tuple[str, ...] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The preconditioned direction Δ = -P g and the last update δ₀, combined as `α Δ + μ δ₀` with
  α, μ minimizing the quadratic model `M(δ) = ½ δᵀ (G + λ I) δ + gᵀ δ` on this batch, where G
  is the exact Gauss-Newton (Fisher) matrix: K-FAC's learning rate and momentum without a
  grid (Martens & Grosse 2015, section 7).

  `update(grads, state, params, *, gauss_newton, loss, **extra_args)` needs
  `gauss_newton=grad_fn.gauss_newton(params, *batch)` from the same `kfax.value_grad_and_stats`
  (two Jacobian-vector products per step) and `loss`, the loss of this batch as a function of
  the params: every `adapt_every` updates it is evaluated before and after the update, and λ
  follows the Levenberg-Marquardt rule on the ratio of the actual to the predicted reduction
  (section 6.5). Other extra arguments (`stats=`) go to the preconditioner. The result is the update itself: apply it with `optax.apply_updates`, with no
  learning rate and no momentum after it (chain weight decay before it, into the gradient).

    grad_fn = kfax.value_grad_and_stats(loss_fn)
    tx = kfax.quadratic_model(kfax.kfac(grad_fn.layers(params, *batch), norm_constraint=None))
    loss, grads, stats = grad_fn(params, *batch, rng=key)
    updates, state = tx.update(grads, state, params, stats=stats,
                               gauss_newton=grad_fn.gauss_newton(params, *batch),
                               loss=lambda p: loss_fn(p, *batch))

  Args:
    preconditioner: maps gradients to the direction P g, e.g. `kfax.kfac(...)` (whose norm
      constraint the quadratic model makes redundant: pass `norm_constraint=None`).
    initial_damping: λ of the model at the start (large: the model's curvature is trusted
      little until the reduction ratio says otherwise).
    adapt_every: updates between adaptations of λ (each costs two evaluations of `loss`).
    damping_decay: ω of the rule, in (0, 1).
    axis_name: under `pmap` / `shard_map`, the device axis to average the Gram matrix over (the
      gradients are the caller's to average, as with any optax transformation).

  References:
    Martens & Grosse, *Optimizing Neural Networks with Kronecker-factored Approximate Curvature*,
    ICML 2015, section 7.
  """

  if not initial_damping > 0:
    raise ValueError(
        f'kfax.quadratic_model: `initial_damping` must be > 0, got {initial_damping!r}.')
  if not (isinstance(adapt_every, int) and adapt_every >= 1):
    raise ValueError(
        f'kfax.quadratic_model: `adapt_every` must be an integer >= 1, got {adapt_every!r}.')
  if not 0 < damping_decay < 1:
    raise ValueError(
        f'kfax.quadratic_model: `damping_decay` must be in (0, 1), got {damping_decay!r}.')

  inner = optax.with_extra_args_support(preconditioner)

  def init_fn(params: Any) -> QuadraticModelState:
    zero = lambda: jnp.zeros((), jnp.float32)
    return QuadraticModelState(jnp.zeros((), jnp.int32), preconditioner.init(params),
                               jax.tree.map(jnp.zeros_like, params),
                               jnp.asarray(initial_damping, jnp.float32), zero(), zero())

  def update_fn(updates: Any, state: QuadraticModelState, params: Any = None, *,
                gauss_newton: Callable[[list[Any]], jax.Array] | None = None,
                loss: Callable[[Any], jax.Array] | None = None,
                **extra_args: Any) -> tuple[Any, QuadraticModelState]:
    if gauss_newton is None or loss is None or params is None:
      raise TypeError(
          'kfax.quadratic_model: update needs the params, `gauss_newton=grad_fn.gauss_newton('
          'params, *batch)` (the Gauss-Newton products of this batch, from the'
          ' kfax.value_grad_and_stats that computed the gradients) and `loss=lambda p:'
          ' loss_fn(p, *batch)`, the loss of this batch.')
    grads = updates
    direction, inner_state = inner.update(grads, state.inner, params, **extra_args)
    delta = jax.tree.map(jnp.negative, direction)
    previous = state.previous
    gram = gauss_newton([delta, previous]).astype(jnp.float32)
    if axis_name is not None:
      gram = jax.lax.pmean(gram, axis_name)
    lam = state.damping
    dd, dp, pp = (_tree_vdot(delta, delta), _tree_vdot(delta, previous),
                  _tree_vdot(previous, previous))
    gram = gram + lam * jnp.stack([jnp.stack([dd, dp]), jnp.stack([dp, pp])])
    dots = jnp.stack([_tree_vdot(grads, delta), _tree_vdot(grads, previous)])
    alpha, mu = coefficients(gram, dots)
    new = jax.tree.map(lambda d, p: (alpha * d + mu * p).astype(d.dtype), delta, previous)
    predicted = 0.5 * (alpha * dots[0] + mu * dots[1])  # M(δ) at its minimum: ½ bᵀc

    def adapted(lam):
      def value(p):
        out = loss(p)  # a loss with aux, (loss, aux), counts by its loss
        return jnp.asarray(out[0] if isinstance(out, tuple) else out, jnp.float32)

      reduction = value(optax.apply_updates(params, new)) - value(params)
      if axis_name is not None:
        reduction = jax.lax.pmean(reduction, axis_name)
      return adapt_damping(lam, reduction, predicted, damping_decay)

    due = (state.count % adapt_every == 0) & (predicted < 0)
    lam = jax.lax.cond(due, adapted, lambda lam: lam, lam)
    return new, QuadraticModelState(optax.safe_increment(state.count), inner_state, new, lam,
                                    alpha, mu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
