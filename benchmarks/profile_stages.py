"""Time the stages of a kfax step separately, with public kfax functions only.

For one model (see `models.py`), each a jitted function timed like `step_time.py` (median, after
compilation, `block_until_ready`):

- `value_and_grad`: the loss and gradients (what SGD needs);
- `stats_empirical`: `kfax.value_grad_and_stats(fisher="empirical")`: + the A and G statistics;
- `stats_mc`: `fisher="mc"`: + the second (sampled) backward pass;
- `update_stats`: `kfax.kfac` update with statistics (EMA of the factors + preconditioning);
- `update_plain`: the update without statistics (preconditioning only);
- `update_refresh`: the update without statistics on a count that triggers a refresh;
- `sgd_update`: `optax.sgd(momentum)`'s update, for reference.

So: statistics = stats_mc - value_and_grad, of which A/G = stats_empirical - value_and_grad and
the MC backward = stats_mc - stats_empirical; preconditioning = update_plain; refresh =
update_refresh - update_plain. The analytic FLOPs of each stage (`cost_model.py`) are printed
beside, with the GFLOP/s each stage reaches.

Run (about a minute per model on 2 CPU cores):

    python benchmarks/profile_stages.py --model resnet18 --mode eigen
"""

from __future__ import annotations

import os

# One OpenBLAS thread: its threads oversubscribe the cores beside XLA's pool and make CPU
# Cholesky / eigh steps 10-50x slower under load (README.md); kfac-jax uses the same LAPACK.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import cost_model
import kfax
import models
import step_time


def median_seconds(fn: Callable, args: tuple, steps: int, warmup: int = 2) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def stage_times(loss_fn: Callable, params: Any, rest: Any, batch: tuple, steps: int,
                **kfac_kwargs: Any) -> dict[str, float]:
  """Median seconds of each stage for `loss_fn(params, rest, *batch) -> (loss, rest)`."""
  p, bs, key = params, rest, jax.random.key(0)
  vg = lambda p, bs, *b: jax.value_and_grad(loss_fn, has_aux=True)(p, bs, *b)
  emp = kfax.value_grad_and_stats(loss_fn, has_aux=True, fisher='empirical')
  mc = kfax.value_grad_and_stats(loss_fn, has_aux=True, fisher='mc')
  tx = kfax.kfac(mc.layers(p, bs, *batch), **kfac_kwargs)
  _, grads, stats = jax.jit(lambda p, bs, k, *b: mc(p, bs, *b, rng=k))(p, bs, key, *batch)
  state = jax.jit(lambda g, s, st: tx.update(g, s, stats=st)[1])(grads, tx.init(p), stats)
  at = lambda count: state._replace(count=jnp.asarray(count, jnp.int32))
  every = kfac_kwargs.get('inverse_every', 10)
  sgd = optax.sgd(1e-3, momentum=0.9)
  return {
      'value_and_grad': median_seconds(vg, (p, bs, *batch), steps),
      'stats_empirical': median_seconds(lambda *a: emp(*a), (p, bs, *batch), steps),
      'stats_mc': median_seconds(lambda p, bs, k, *b: mc(p, bs, *b, rng=k),
                                 (p, bs, key, *batch), steps),
      'update_stats': median_seconds(lambda g, s, st: tx.update(g, s, stats=st),
                                     (grads, at(1), stats), steps),
      'update_plain': median_seconds(lambda g, s: tx.update(g, s, stats=None), (grads, at(1)),
                                     steps),
      'update_refresh': median_seconds(lambda g, s: tx.update(g, s, stats=None),
                                       (grads, at(every)), steps),
      'sgd_update': median_seconds(lambda g, s: sgd.update(g, s), (grads, sgd.init(p)), steps),
  }


STAGES = ('forward+backward', 'A and G statistics', 'MC backward',
          'factor EMA (update_stats - update_plain)', 'precondition (update_plain)', 'refresh')


def split(t: dict[str, float]) -> dict[str, float]:
  """The seconds of each of `STAGES`, from `stage_times`' differences."""
  return dict(zip(STAGES, (
      t['value_and_grad'], t['stats_empirical'] - t['value_and_grad'],
      t['stats_mc'] - t['stats_empirical'], t['update_stats'] - t['update_plain'],
      t['update_plain'], t['update_refresh'] - t['update_plain'])))


def report(name: str, mode: str, t: dict[str, float], flops: dict[str, float]) -> dict[str, Any]:
  keys = ('forward_backward', None, 'mc_backward', None, 'precondition', 'refresh')
  analytic = {'A and G statistics': flops['a_stats'] + flops['g_stats']}
  analytic.update({s: flops[k] for s, k in zip(STAGES, keys) if k})
  stages = {s: (seconds, analytic.get(s)) for s, seconds in split(t).items()}
  print(f'\n{name} ({mode}): stage | ms | x value_and_grad | analytic GFLOPs | GFLOP/s')
  print('|---|---|---|---|---|')
  for stage, (seconds, f) in stages.items():
    rate = f'{f / seconds / 1e9:.1f}' if f and seconds > 0 else '-'
    gf = f'{f / 1e9:.3f}' if f else '-'
    print(f'| {stage} | {seconds * 1e3:.2f} | {seconds / t["value_and_grad"]:.2f} | {gf} |'
          f' {rate} |')
  return {k: {'seconds': s, 'flops': f} for k, (s, f) in stages.items()}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='resnet18', choices=sorted(models.DEFAULTS))
  p.add_argument('--mode', default='eigen', choices=('eigen', 'factored'))
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--batch', type=int)
  p.add_argument('--image_size', type=int)
  p.add_argument('--width', type=int)
  p.add_argument('--out', help='also write the stage times as JSON')
  args = p.parse_args(argv)
  config = cost_model.override(models.DEFAULTS[args.model], args)
  problem = step_time.make_problem(args.model, config)
  times = stage_times(step_time.make_loss(problem), problem.params, problem.batch_stats,
                      (problem.x, problem.y), args.steps, damping=1e-3, inverse_every=100,
                      damping_mode=args.mode)
  flops = cost_model.analyze(args.model, config)['totals'][args.mode]
  print(f'jax {jax.__version__}; {args.model} {config}')
  stages = report(args.model, args.mode, times, flops)
  if args.out:
    Path(args.out).write_text(json.dumps({'times_s': times, 'stages': stages}, indent=1))


if __name__ == '__main__':
  main()
