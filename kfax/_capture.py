"""Capture: the loss, its gradients and each layer's K-FAC statistics from one forward pass.

`flax.linen.intercept_methods` sees every `nn.Dense` / `nn.Conv` call inside the loss. For each call
it keeps the input (for A) and adds a zero perturbation to the output, whose gradient is dL/dy
(for G). A first, shape-only trace (`jax.eval_shape`) sizes the perturbations; the real pass is one
`jax.vjp`, pulled back once for the gradients and, with `fisher="mc"`, once more with targets
sampled from the model (the parameter cotangents of that second pull-back are dead code that XLA
removes under `jit`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kfax import _layers

FISHER_TYPES = ('empirical', 'mc')
Stats = dict[str, dict[str, jax.Array]]

_local = threading.local()


def path_name(path: tuple[Any, ...]) -> str:
  """'a/b/c' for a pytree key path or a Flax module path."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        key = getattr(key, attr)
        break
    parts.append(str(key))
  return '/'.join(parts)


class _Trace:
  """What one trace of the loss saw: supported layer calls, unsupported ones, marked outputs."""

  def __init__(self, params: Any, perturbations: list[jax.Array] | None, mark_outputs: bool):
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    self.kernel_paths = {id(leaf): path_name(path[:-1]) for path, leaf in leaves}
    self.perturbations = perturbations
    self.mark_outputs = mark_outputs
    self.calls: list[tuple[str, _layers.FactorFn]] = []
    self.inputs: list[jax.Array] = []
    self.outputs_seen: list[jax.Array] = []
    self.unsupported: dict[str, str] = {}
    self.outputs: list[tuple[jax.Array, Callable]] = []

  def key(self, module: nn.Module) -> str:
    kernel = module.variables.get('params', {}).get('kernel')
    return self.kernel_paths.get(id(kernel)) or path_name(module.path)

  def intercept(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    made = _layers.factor_fn(context.module) if context.method_name == '__call__' else None
    y = next_fun(*args, **kwargs)
    if made is None:
      return y
    fn, reason = made
    key = self.key(context.module)
    if fn is None:
      self.unsupported[key] = f'{type(context.module).__name__} with {reason}'
      return y
    self.calls.append((key, fn))
    if self.perturbations is None:
      self.outputs_seen.append(y)
      return y
    self.inputs.append(args[0] if args else kwargs['inputs'])
    return y + self.perturbations[len(self.calls) - 1]


@contextlib.contextmanager
def _tracing(trace: _Trace) -> Iterator[None]:
  stack = _local.__dict__.setdefault('stack', [])
  stack.append(trace)
  try:
    with nn.intercept_methods(trace.intercept):
      yield
  finally:
    stack.pop()


def mark_output(logits: jax.Array, sampled_cotangent: Callable) -> None:
  """Called by kfax losses: registers a model output and its MC cotangent with the capture."""
  stack = getattr(_local, 'stack', [])
  if stack and stack[-1].mark_outputs:
    stack[-1].outputs.append((logits, sampled_cotangent))


def _accumulate(calls: list[tuple[str, _layers.FactorFn]], xs, dys) -> Stats:
  """Per-layer statistics: a module called several times adds A terms and averages G terms."""
  a_sums: dict[str, jax.Array] = {}
  g_terms: dict[str, list[jax.Array]] = {}
  for (key, fn), x, dy in zip(calls, xs, dys):
    with jax.named_scope(f'kfax/stats/{key}'):
      a, g = fn(x, dy)
    a_sums[key] = a_sums[key] + a if key in a_sums else a
    g_terms.setdefault(key, []).append(g)
  return {
      key: {'a_factor': a_sums[key], 'g_factor': sum(g_terms[key]) / len(g_terms[key])}
      for key in a_sums
  }


def value_grad_and_stats(
    loss_fn: Callable[..., Any], *, has_aux: bool = False, fisher: str = 'empirical'
) -> Callable[..., tuple[Any, Any, Stats]]:
  """Wraps a Flax loss to return the loss, its gradients and this batch's K-FAC statistics.

  `loss_fn(params, *args, **kwargs)` must return a mean over examples (or `(loss, aux)` with
  `has_aux=True`) and may call any Flax model, with mutable collections, anywhere inside. Every
  `nn.Dense` and `nn.Conv` call is captured by its kernel's path in `params` ('Dense_0',
  'Block_0/Conv_1', ...). Unsupported settings of those layers (grouped convs, masked kernels)
  are reported with a warning and their parameters pass through `kfax.kfac` unchanged.

  Args:
    loss_fn: the loss, differentiated with respect to its first argument.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    fisher: `"empirical"` takes G from the gradients of the loss itself (any scalar mean loss);
      `"mc"` takes G from one backward pass with targets sampled from the model's predictive
      distribution (the Fisher proper), which needs the loss to be built from
      `kfax.softmax_cross_entropy`, `kfax.sigmoid_binary_cross_entropy` or
      `kfax.squared_error`, and an `rng` key.

  Returns:
    `f(params, *args, rng=None, **kwargs) -> (loss or (loss, aux), grads, stats)`, where `stats`
    maps each captured layer to float32 `{'a_factor': (d_in, d_in), 'g_factor': (d_out, d_out)}`
    (with a bias, d_in counts its homogeneous coordinate). Pass `stats` to
    `kfax.kfac`'s update as the `stats=` extra argument.
  """
  if fisher not in FISHER_TYPES:
    raise ValueError(
        f'kfax.value_grad_and_stats: `fisher` must be one of {FISHER_TYPES}, got {fisher!r}.'
    )

  def run(params: Any, trace: _Trace, args: tuple, kwargs: dict) -> tuple[jax.Array, Any]:
    with _tracing(trace):
      out = loss_fn(params, *args, **kwargs)
    loss, aux = out if has_aux else (out, None)
    if jnp.shape(loss) != ():
      raise ValueError(
          'kfax.value_grad_and_stats: loss_fn must return a scalar mean loss'
          f'{" as the first element of (loss, aux)" if has_aux else ""}, got shape'
          f' {jnp.shape(loss)}.'
      )
    return loss, aux

  def value_grad_stats(params: Any, *args: Any, rng: jax.Array | None = None, **kwargs: Any):
    if fisher == 'mc' and rng is None:
      raise ValueError(
          'kfax.value_grad_and_stats: fisher="mc" samples targets and needs a PRNG key; call'
          ' f(params, ..., rng=jax.random.key(step)).'
      )
    probe: list[_Trace] = []

    def shapes_only(p):
      probe.append(_Trace(p, None, mark_outputs=False))
      run(p, probe[0], args, kwargs)
      return probe[0].outputs_seen

    layer_outputs = jax.eval_shape(shapes_only, params)
    (probe,) = probe
    if not probe.calls:
      raise ValueError(
          'kfax.value_grad_and_stats: loss_fn called no supported layer (flax.linen.Dense or'
          ' flax.linen.Conv), so there is nothing to precondition.'
      )
    for key, reason in probe.unsupported.items():
      warnings.warn(
          f'kfax: layer {key!r} ({reason}) is not supported by K-FAC capture; its parameters'
          ' pass through kfax.kfac unchanged.',
          stacklevel=2,
      )
    # zeros_like keeps the output's type: under shard_map(check_vma=True) a device-varying
    # perturbation, whose gradient is this device's dL/dy rather than its sum over devices.
    perturbations = [jnp.zeros_like(s) for s in layer_outputs]
    traces: list[_Trace] = []

    def forward(p, perts):
      traces.append(_Trace(p, perts, mark_outputs=fisher == 'mc'))
      loss, aux = run(p, traces[0], args, kwargs)
      return (loss, [z for z, _ in traces[0].outputs]), (aux, traces[0].inputs)

    with jax.named_scope('kfax/forward_backward'):
      (loss, outputs), pullback, (aux, inputs) = jax.vjp(
          forward, params, perturbations, has_aux=True
      )
      (trace,) = traces
      if [key for key, _ in trace.calls] != [key for key, _ in probe.calls]:
        raise ValueError(
            'kfax.value_grad_and_stats: loss_fn called the layers differently on two traces;'
            ' it must be a pure function of its arguments.'
        )
      grads, dys = pullback((jnp.ones_like(loss), [jnp.zeros_like(z) for z in outputs]))
      if fisher == 'mc':
        if not outputs:
          raise ValueError(
              'kfax.value_grad_and_stats: fisher="mc" needs the loss to be built from'
              ' kfax.softmax_cross_entropy, kfax.sigmoid_binary_cross_entropy or'
              ' kfax.squared_error, which mark the distribution to sample from; use'
              ' fisher="empirical" for any other loss.'
          )
        keys = jax.random.split(rng, len(outputs))
        cotangents = [
            cot(k, z) for k, z, (_, cot) in zip(keys, outputs, trace.outputs, strict=True)
        ]
        _, dys = pullback((jnp.zeros_like(loss), cotangents))
    stats = _accumulate(trace.calls, inputs, dys)
    return ((loss, aux) if has_aux else loss), grads, stats

  return value_grad_stats
