"""`kfax.accumulate`: one update from several micro-batches (chainerkfac's `acc_iters`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def accumulate(fn: Callable[..., Any], acc_iters: int) -> Callable[..., Any]:
  """Runs `fn` on `acc_iters` micro-batches in a `lax.scan` and averages everything it returns.

  Wrap `kfax.value_grad_and_stats(...)` (or `jax.value_and_grad(...)`) to average the loss, the
  gradients and the K-FAC statistics of micro-batches that together form one batch; then make
  one optimizer update, so collectives (the gradient mean, kfax's statistics all-reduce) run once
  per accumulated step, not per micro-batch. With equal micro-batches the averages equal the
  full batch's: the loss and gradients are means, and so are A = mean aaᵀ and G = mean ggᵀ.

  Under `jax.shard_map` with `check_vma=True`, the gradients of replicated parameters are summed
  over devices inside the backward pass, so inside the scan: once per micro-batch. Make the
  parameters device-varying first and average the gradients once after, as `examples/_common.py`
  does: `fn(jax.tree.map(lambda p: jax.lax.pcast(p, axis, to='varying'), params), ...)`, then
  `jax.lax.pmean(grads, axis)`. Auxiliary outputs (`has_aux=True`) are averaged too: for Flax
  BatchNorm's running statistics that is the mean of the micro-batches' updates.

  `optax.MultiSteps` cannot do this for K-FAC: it calls the inner update on every micro-step
  but keeps the inner state only on the last, so every micro-batch's statistics but the last
  are dropped. Accumulating before the update keeps them all and needs no extra state.

  Args:
    fn: `fn(params, *batch_args, rng=None, **kwargs)`.
    acc_iters: micro-batches per batch (>= 1). Every positional argument after `params` is
      split along its leading axis, which must be divisible by `acc_iters`; keyword arguments
      reach every micro-batch unchanged; an `rng` key is split, one key per micro-batch.

  Returns:
    A function with `fn`'s signature whose outputs are the micro-batch means of `fn`'s.
  """
  if not isinstance(acc_iters, int) or acc_iters < 1:
    raise ValueError(f'kfax.accumulate: `acc_iters` must be an integer >= 1, got {acc_iters!r}.')

  def accumulated(params: Any, *batch: Any, rng: jax.Array | None = None, **kwargs: Any) -> Any:
    def split(x: jax.Array) -> jax.Array:
      if jnp.ndim(x) == 0 or x.shape[0] % acc_iters:
        raise ValueError(
            f'kfax.accumulate: batch arguments need a leading axis divisible by acc_iters='
            f'{acc_iters}, got shape {jnp.shape(x)}.')
      return x.reshape(acc_iters, x.shape[0] // acc_iters, *x.shape[1:])

    micro = jax.tree.map(split, batch)
    keys = None if rng is None else jax.random.split(rng, acc_iters)

    def call(inputs, key):
      return fn(params, *inputs, **kwargs) if key is None else fn(params, *inputs, rng=key,
                                                                   **kwargs)

    def body(total, xs):
      inputs, key = xs
      out = call(inputs, key)
      return jax.tree.map(jnp.add, total, out), None

    first = jax.tree.map(lambda x: x[0], micro), None if keys is None else keys[0]
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(call, *first))
    total, _ = jax.lax.scan(body, zeros, (micro, keys))
    return jax.tree.map(lambda x: x / acc_iters, total)

  return accumulated
