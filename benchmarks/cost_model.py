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

Transformer layers: attention's query/key/value/out (`nn.DenseGeneral`) count as Dense layers
over their contracted and output axes. `nn.Embed` is one Kronecker pair with a diagonal token
side, as kfax keeps it: its lookup (a gather: no forward FLOPs, A statistics `N·T`, a scatter of
ones) and its tied `attend` (`x Eᵀ`: forward `2·N·T·d·vocab`, statistics `2·N·T·d²` and a
diagonal `2·N·T·vocab`) both add statistics, preconditioning and refresh are counted once. A
diagonal side (the token side, or any side above kfax's `max_factor_dim`, 8192) drops its
products from the preconditioning and its decomposition from the refresh. LayerNorm, BatchNorm
(unit-wise 2x2 blocks) and the learned positions (diagonal) are negligible and not counted.

The predicted kfax/SGD ratio for statistics every `s` and refresh every `i` steps is
`(F_fb + F_precond + (F_mc + F_A + F_G)/s + F_refresh/i) / F_fb`: the limit if every stage ran at
the forward+backward's FLOP rate. `step_time.py` prints it next to the measured ratio.

Run alone (no timing, a few seconds):

    python benchmarks/cost_model.py --models mlp,cnn,resnet18,resnet50 --stats_every 10 \\
        --inverse_every 100
    python benchmarks/cost_model.py --models resnet50,transformer --size gpu \\
        --dtype bfloat16   # gpu.sh's sizes; compiles the loss at that size, longer on a CPU
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
MAX_FACTOR_DIM = 8192  # kfax.value_grad_and_stats' default: a larger side is kept diagonal


@dataclasses.dataclass(frozen=True)
class LayerCost:
  """FLOPs of one Dense/Conv/DenseGeneral/Embed call's K-FAC work (see the module docstring)."""

  name: str
  n: int  # examples
  t: int  # output positions per example
  k: int  # kernel rows (patch size x input channels, or input features); 0 for a lookup
  d_in: int  # A's size: k (+1 with a bias)
  d_out: int  # G's size: output channels / features
  diag_in: bool = False  # A kept diagonal (an Embed's token side, or d_in > MAX_FACTOR_DIM)
  diag_out: bool = False  # G kept diagonal (d_out > MAX_FACTOR_DIM)
  shared: bool = False  # a further call of a layer counted before: statistics only

  @property
  def forward(self) -> float:
    return 2.0 * self.n * self.t * self.k * self.d_out

  @property
  def a_stats(self) -> float:
    if not self.diag_in:
      return 2.0 * self.n * self.t * self.d_in**2
    return self.n * self.t * (2.0 * self.d_in if self.k else 1.0)  # a lookup scatters ones

  @property
  def g_stats(self) -> float:
    return 2.0 * self.n * self.t * (self.d_out if self.diag_out else self.d_out**2)

  def precondition(self, mode: str) -> float:
    if self.shared:
      return 0.0
    products = ((0 if self.diag_in else 2.0 * self.d_in**2 * self.d_out)
                + (0 if self.diag_out else 2.0 * self.d_in * self.d_out**2))
    return 2 * products if mode == 'eigen' else products

  def refresh(self, mode: str) -> float:
    if self.shared:
      return 0.0
    c = EIGH_CONSTANT if mode == 'eigen' else CHOLESKY_INVERSE_CONSTANT
    return c * ((0 if self.diag_in else self.d_in**3) + (0 if self.diag_out else self.d_out**3))

  def asdict(self) -> dict[str, Any]:
    """The fields, without the flags that keep their defaults (so a Dense/Conv layer's dict has
    the six size fields only)."""
    out = dataclasses.asdict(self)
    return {k: v for k, v in out.items()
            if k not in ('diag_in', 'diag_out', 'shared') or v}


def _kronecker(name: str, n: int, t: int, k: int, d_in: int, d_out: int,
               seen: set[str], token_side: bool = False) -> LayerCost:
  """A LayerCost whose sides above MAX_FACTOR_DIM are diagonal and whose later calls are shared."""
  cost = LayerCost(name, n, t, k, d_in, d_out, diag_in=token_side or d_in > MAX_FACTOR_DIM,
                   diag_out=d_out > MAX_FACTOR_DIM, shared=name in seen)
  seen.add(name)
  return cost


def _call_cost(module: nn.Module, method: str, args: tuple, y: Any,
               seen: set[str]) -> LayerCost | None:
  """The LayerCost of one call of a Dense, Conv, DenseGeneral or Embed (None for others)."""
  name = '/'.join(str(p) for p in module.path)
  if method == '__call__' and isinstance(module, (nn.Dense, nn.Conv)):
    kernel = module.variables['params']['kernel']
    k = math.prod(kernel.shape[:-1])
    if isinstance(module, nn.Conv):
      n, t = y.shape[0], math.prod(y.shape[1:-1])
    else:
      n, t = math.prod(y.shape[:-1]), 1
    return _kronecker(name, n, t, k, k + bool(module.use_bias), kernel.shape[-1], seen)
  if method == '__call__' and isinstance(module, nn.DenseGeneral):
    kernel = module.variables['params']['kernel']
    d_out = math.prod(module.features) if isinstance(module.features, (tuple, list)) \
        else module.features
    k = kernel.size // d_out
    return _kronecker(name, y.size // d_out, 1, k, k + bool(module.use_bias), d_out, seen)
  if isinstance(module, nn.Embed) and method in ('__call__', 'attend'):
    v, d = module.num_embeddings, module.features
    n = args[0].size if method == '__call__' else y.size // v
    k = 0 if method == '__call__' else v  # a lookup is a gather; attend is x (n, d) @ Eᵀ
    return _kronecker(name, n, 1, k, v, d, seen, token_side=True)
  return None


def layer_costs(model: nn.Module, variables: dict, x: jax.Array) -> list[LayerCost]:
  """Every Dense/Conv/DenseGeneral/Embed call of `model.apply(variables, x)` (shapes only,
  nothing is computed)."""
  seen: list[LayerCost] = []
  names: set[str] = set()

  def intercept(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    y = next_fun(*args, **kwargs)
    cost = _call_cost(context.module, context.method_name, args, y, names)
    if cost is not None:
      seen.append(cost)
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
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], axis=-1))

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


def predicted_ratio(total: dict[str, float], stats_every: int, inverse_every: int,
                    subsample: int = 1) -> float:
  """Predicted amortized kfax step / SGD step at equal FLOP rates; A and G statistics from every
  `subsample`-th example (`value_grad_and_stats(subsample=)`), the MC backward from all."""
  stats = total['mc_backward'] + (total['a_stats'] + total['g_stats']) / subsample
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


def analyze(name: str, config: models.ModelConfig, dtype: str = 'float32',
            fb_flops: float | None = None, fb_source: str = 'given') -> dict[str, Any]:
  """Per-layer and total FLOPs of model `name` at `config` (computing in `dtype`), both damping
  modes. `fb_flops`, if given, is the forward+backward's FLOP count (e.g. XLA's count of an
  already compiled SGD step, `fb_source` says which), and saves compiling the loss's
  `value_and_grad` here."""
  model, example = models.build(name, config, dtype)
  if fb_flops is None:
    params, batch_stats = models.init(model, example)
  else:  # shapes are enough for layer_costs: nothing to compile
    params, batch_stats = jax.eval_shape(lambda: models.init(model, example))
  variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
  x, y = (jnp.zeros(s.shape, s.dtype) for s in models.batch_shapes(name, config))
  layers = layer_costs(model, variables, x)
  if fb_flops is not None:
    fb, source = fb_flops, fb_source
  else:
    fb, source = forward_backward_flops(model, variables, x, y, layers)
  return {
      'layers': [layer.asdict() for layer in layers],
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


def print_totals(name: str, analysis: dict[str, Any], stats_every: int, inverse_every: int,
                 subsample: int = 1) -> None:
  for mode, total in analysis['totals'].items():
    parts = ', '.join(f'{k} {v / 1e9:.3f}' for k, v in total.items())
    ratio = predicted_ratio(total, stats_every, inverse_every, subsample)
    print(f'{name} {mode}: GFLOPs {parts}; predicted kfax/SGD at stats every {stats_every}'
          f' (subsample {subsample}), refresh every {inverse_every}: {ratio:.3f}'
          f' (forward+backward from {analysis["forward_backward_source"]})')


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='mlp,cnn,resnet18,resnet50',
                 help=f'comma-separated, from {",".join(models.DEFAULTS)}')
  p.add_argument('--size', default='cpu', choices=('cpu', 'gpu'),
                 help='models.DEFAULTS (cpu) or models.GPU (gpu.sh\'s sizes)')
  p.add_argument('--dtype', default='float32', choices=models.DTYPES, help='compute dtype')
  p.add_argument('--stats_every', type=int, default=10)
  p.add_argument('--inverse_every', type=int, default=100)
  p.add_argument('--subsample', type=int, default=1,
                 help='statistics from every k-th example (value_grad_and_stats(subsample=))')
  add_size_flags(p)
  p.add_argument('--layers', dest='print_layers', action='store_true',
                 help='print the per-layer table')
  args = p.parse_args(argv)
  for name in args.models.split(','):
    config = override(base_config(name, args.size), args)
    analysis = analyze(name, config, args.dtype)
    if args.print_layers:
      print_layers(name, analysis['layers'])
    print_totals(name, analysis, args.stats_every, args.inverse_every, args.subsample)


SIZE_FLAGS = {
    'batch': "every model's batch size",
    'image_size': "the image models' image size",
    'width': "every model's width",
    'classes': "every model's classes (the LM's vocabulary)",
    'seq_len': "the LM's sequence length",
    'depth': "the LM's number of blocks",
    'heads': "the LM's attention heads",
}


def add_size_flags(p: argparse.ArgumentParser) -> None:
  """--batch, --image_size, ...: each overrides the field of every model that has it."""
  for flag, what in SIZE_FLAGS.items():
    p.add_argument(f'--{flag}', type=int, help=f'override {what}')


def base_config(name: str, size: str = 'cpu') -> models.ModelConfig:
  """The model's CPU default or its gpu.sh size."""
  sizes = models.GPU if size == 'gpu' else models.DEFAULTS
  if name not in sizes:
    raise ValueError(f'no {size} size for model {name!r}; {size} sizes: {sorted(sizes)}')
  return sizes[name]


def override(config: models.ModelConfig, args: argparse.Namespace) -> models.ModelConfig:
  """`config` with the size flags that were given, on the fields the model has (not None)."""
  changes = {}
  for field in SIZE_FLAGS:
    value = getattr(args, field, None)
    if value is not None and getattr(config, field) is not None:
      changes[field] = value
  return dataclasses.replace(config, **changes)


if __name__ == '__main__':
  main()
