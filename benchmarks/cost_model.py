"""Analytic FLOP model of a kfax step, per layer, and the overhead ratio it predicts.

All counts are FLOPs with a multiply-add counted as 2 (the convention of XLA's
`cost_analysis()`); a `(m, k) @ (k, n)` product costs `2·m·k·n`. For a layer called on N examples
at T output positions (T = 1 for Dense), with A of size `d_in` (kernel rows + bias) and G of size
`d_out`:

- forward + backward of the loss: XLA's `cost_analysis()['flops']` of the jitted
  `value_and_grad` where the backend reports it, else `3 · 2·N·T·k·d_out` summed over layers
  (k = kernel rows, the forward's multiply-adds; the backward does twice the forward's);
- the extra backward pass of `fisher="mc"` (activation gradients only): `2·N·T·k·d_out`;
- factor statistics: A `2·N·T·d_in²` (patches included), G `2·N·T·d_out²`;
- preconditioning: eigen mode `2·2·(d_in²·d_out + d_in·d_out²)` (four products), factored
  mode half of that (two products);
- refresh: eigen mode `9·n³` per factor (symmetric QR with eigenvectors, Golub & Van Loan);
  factored mode `(7/3)·n³` (Cholesky n³/3, two triangular solves against I, n³ each).

The predicted kfax/SGD ratio for statistics every `s` and refresh every `i` steps is
`(F_fb + F_precond + (F_mc + F_A + F_G)/s + F_refresh/i) / F_fb`: the limit if every stage ran at
the forward+backward's FLOP rate. `step_time.py` prints it next to the measured ratio.

Run alone (no timing, a few seconds):

    python benchmarks/cost_model.py --models mlp,cnn,resnet18,resnet50 --stats_every 10 \\
        --inverse_every 100
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import models

EIGH_CONSTANT = 9.0
CHOLESKY_INVERSE_CONSTANT = 7.0 / 3.0


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """FLOPs of one Dense/Conv call's K-FAC work (see the module docstring)."""

  name: str
  n: int  # examples
  t: int  # output positions per example
  k: int  # kernel rows (patch size x input channels, or input features)
  d_in: int  # A's size: k (+1 with a bias)
  d_out: int  # G's size: output channels / features

  @property
  def forward(self) -> float:
    return 2.0 * self.n * self.t * self.k * self.d_out

  @property
  def a_stats(self) -> float:
    return 2.0 * self.n * self.t * self.d_in**2

  @property
  def g_stats(self) -> float:
    return 2.0 * self.n * self.t * self.d_out**2

  def precondition(self, mode: str) -> float:
    eigen = 4.0 * (self.d_in**2 * self.d_out + self.d_in * self.d_out**2)
    return eigen if mode == 'eigen' else eigen / 2

  def refresh(self, mode: str) -> float:
    c = EIGH_CONSTANT if mode == 'eigen' else CHOLESKY_INVERSE_CONSTANT
    return c * (self.d_in**3 + self.d_out**3)


def layer_costs(model: nn.Module, variables: dict, x: jax.Array) -> list[LayerCost]:
  """Every Dense/Conv call of `model.apply(variables, x)` (shapes only, nothing is computed)."""
  seen: list[LayerCost] = []

  def intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Dense, nn.Conv)):
      kernel = module.variables['params']['kernel']
      k = math.prod(kernel.shape[:-1])
      if isinstance(module, nn.Conv):
        n, t = y.shape[0], math.prod(y.shape[1:-1])
      else:
        n, t = math.prod(y.shape[:-1]), 1
      name = '/'.join(str(p) for p in module.path)
      seen.append(LayerCost(name, n, t, k, k + bool(module.use_bias), kernel.shape[-1]))
    return y

  def apply(v, inputs):
    with nn.intercept_methods(intercept):
      return model.apply(v, inputs, train=True, mutable=['batch_stats'])

  jax.eval_shape(apply, variables, x)
  return seen


def xla_flops(fn: Callable, *args: Any) -> float | None:
  """XLA's FLOP count of `jax.jit(fn)(*args)`, or None where the backend gives none."""
  try:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  except Exception:  # noqa: BLE001 - any backend without cost analysis
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def forward_backward_flops(model: nn.Module, variables: dict, x: jax.Array, y: jax.Array,
                           layers: list[LayerCost]) -> tuple[float, str]:
  """(FLOPs of the loss's value_and_grad, 'xla' or 'analytic')."""

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))

  flops = xla_flops(jax.value_and_grad(loss), variables['params'])
  if flops is not None:
    return flops, 'xla'
  return 3.0 * sum(layer.forward for layer in layers), 'analytic'


def totals(layers: list[LayerCost], fb_flops: float, mode: str) -> dict[str, float]:
  """Whole-model FLOPs of each stage."""
  return {
      'forward_backward': fb_flops,
      'mc_backward': sum(layer.forward for layer in layers),
      'a_stats': sum(layer.a_stats for layer in layers),
      'g_stats': sum(layer.g_stats for layer in layers),
      'precondition': sum(layer.precondition(mode) for layer in layers),
      'refresh': sum(layer.refresh(mode) for layer in layers),
  }


def predicted_ratio(total: dict[str, float], stats_every: int, inverse_every: int) -> float:
  """Predicted amortized kfax step / SGD step at equal FLOP rates."""
  stats = total['mc_backward'] + total['a_stats'] + total['g_stats']
  extra = total['precondition'] + stats / stats_every + total['refresh'] / inverse_every
  return 1.0 + extra / total['forward_backward']


def stage_ratios(total: dict[str, float]) -> dict[str, float]:
  """Each stage's FLOPs over the forward+backward's (predicted time over the SGD step)."""
  fb = total['forward_backward']
  return {
      'stats': (total['mc_backward'] + total['a_stats'] + total['g_stats']) / fb,
      'precondition': total['precondition'] / fb,
      'refresh': total['refresh'] / fb,
  }


def analyze(name: str, config: models.ModelConfig) -> dict[str, Any]:
  """Per-layer and total FLOPs of model `name` at `config`, both damping modes."""
  model, example = models.build(name, config)
  params, batch_stats = models.init(model, example)
  variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
  x = jnp.zeros((config.batch, *example), jnp.float32)
  y = jnp.zeros((config.batch,), jnp.int32)
  layers = layer_costs(model, variables, x)
  fb, source = forward_backward_flops(model, variables, x, y, layers)
  return {
      'layers': [dataclasses.asdict(layer) for layer in layers],
      'forward_backward_source': source,
      'totals': {mode: totals(layers, fb, mode) for mode in ('eigen', 'factored')},
  }


def print_layers(name: str, layers: list[dict]) -> None:
  print(f'\n{name}: per-layer MFLOPs (A/G statistics, eigen-mode precondition and refresh)')
  print(f'{"layer":<34}{"N·T":>8}{"d_in":>6}{"d_out":>6}{"fwd":>9}{"A":>9}{"G":>9}'
        f'{"precond":>9}{"eigh":>10}')
  for d in layers:
    layer = LayerCost(**d)
    print(f'{layer.name[-33:]:<34}{layer.n * layer.t:>8}{layer.d_in:>6}{layer.d_out:>6}'
          f'{layer.forward / 1e6:>9.1f}{layer.a_stats / 1e6:>9.1f}{layer.g_stats / 1e6:>9.1f}'
          f'{layer.precondition("eigen") / 1e6:>9.1f}{layer.refresh("eigen") / 1e6:>10.1f}')


def print_totals(name: str, analysis: dict[str, Any], stats_every: int, inverse_every: int) -> None:
  for mode, total in analysis['totals'].items():
    parts = ', '.join(f'{k} {v / 1e9:.3f}' for k, v in total.items())
    ratio = predicted_ratio(total, stats_every, inverse_every)
    print(f'{name} {mode}: GFLOPs {parts}; predicted kfax/SGD at stats every {stats_every},'
          f' refresh every {inverse_every}: {ratio:.3f}'
          f' (forward+backward from {analysis["forward_backward_source"]})')


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='mlp,cnn,resnet18,resnet50')
  p.add_argument('--stats_every', type=int, default=10)
  p.add_argument('--inverse_every', type=int, default=100)
  p.add_argument('--batch', type=int, help='override every model\'s batch size')
  p.add_argument('--image_size', type=int, help='override every model\'s image size')
  p.add_argument('--width', type=int, help='override every model\'s width')
  p.add_argument('--layers', action='store_true', help='print the per-layer table')
  args = p.parse_args(argv)
  for name in args.models.split(','):
    config = override(models.DEFAULTS[name], args)
    analysis = analyze(name, config)
    if args.layers:
      print_layers(name, analysis['layers'])
    print_totals(name, analysis, args.stats_every, args.inverse_every)


def override(config: models.ModelConfig, args: argparse.Namespace) -> models.ModelConfig:
  """`config` with the size flags that were given."""
  changes = {k: getattr(args, k) for k in ('batch', 'image_size', 'width')
             if getattr(args, k, None) is not None}
  return dataclasses.replace(config, **changes)


if __name__ == '__main__':
  main()
