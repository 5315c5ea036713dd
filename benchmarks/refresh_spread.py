"""The slowest step of a refresh period: `kfax.kfac(refresh="together")` against `"staggered"`.

With `"together"` every `inverse_every`-th update decomposes every Kronecker factor, and that
step, which all devices of a data-parallel run wait for, costs the whole refresh. `"staggered"`
gives each update of the period a cost-balanced share of the factors. The amortized cost is the
same; the slowest step should shrink towards `plain + refresh / inverse_every`.

For each model (`models.py`, CPU sizes), both settings run the same compiled plain step (no
statistics; the first statistics were absorbed before timing) through whole periods, with
SGD's step, the three interleaved step by step so that machine load hits them alike. The table
gives the median and the slowest step of each, their mean (the amortized step at this period)
and SGD's median step for scale.

Run (about 4 minutes on 2 CPU cores):

    python benchmarks/refresh_spread.py
    python benchmarks/refresh_spread.py --models resnet50 --inverse_every 20 --mode factored

Writes benchmarks/results/refresh_spread.md and .json.
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import optax

import kfax
import models
import step_time

RESULTS = Path(__file__).resolve().parent / 'results'
REFRESHES = ('together', 'staggered')


def kfax_step(problem: step_time.Problem, table: kfax.LayerTable, refresh: str,
              args: argparse.Namespace) -> tuple:
  """`(run(state, count), state)`: the plain step with `refresh` at that update count, and a
  state that has absorbed one batch of statistics."""
  loss_fn, key = step_time.make_loss(problem), jax.random.key(0)
  tx = optax.chain(kfax.kfac(table, damping=args.damping, inverse_every=args.inverse_every,
                             damping_mode=args.mode, refresh=refresh),
                   optax.sgd(step_time.LEARNING_RATE, momentum=step_time.MOMENTUM))
  state = step_time.copy_tree((problem.params, problem.batch_stats, tx.init(problem.params)))
  stats, _ = step_time.compile_step(step_time.stats_step_fn(loss_fn, tx), state, problem, True)
  plain, _ = step_time.compile_step(step_time.plain_step_fn(loss_fn, tx), state, problem, True)
  state = jax.block_until_ready(stats(state, problem.x, problem.y, key)[0])

  def run(s, count: int):
    return plain(step_time.set_count(count)(s, 0), problem.x, problem.y, key)[0]

  return run, state


def kfax_steps(problem: step_time.Problem, args: argparse.Namespace) -> dict:
  """`kfax_step` of each refresh setting, around one layer table."""
  table = step_time.stats_fn(step_time.make_loss(problem)).layers(
      problem.params, problem.batch_stats, problem.x, problem.y)
  return {refresh: kfax_step(problem, table, refresh, args) for refresh in REFRESHES}


def sgd_step(problem: step_time.Problem) -> tuple:
  """SGD's step, as `(run(state, count), state)`, timed beside the others for scale."""
  tx = optax.sgd(step_time.LEARNING_RATE, momentum=step_time.MOMENTUM)
  state = step_time.copy_tree((problem.params, problem.batch_stats, tx.init(problem.params)))
  step, _ = step_time.compile_step(step_time.plain_step_fn(step_time.make_loss(problem), tx),
                                   state, problem, True)
  key = jax.random.key(0)
  return lambda s, count: step(s, problem.x, problem.y, key)[0], state


def time_periods(steps: dict, args: argparse.Namespace) -> dict[str, list[float]]:
  """Seconds of each step of each series over `--periods` whole periods (after one untimed),
  interleaved step by step."""
  states = {k: state for k, (_, state) in steps.items()}
  times = {k: [] for k in steps}
  period = args.inverse_every
  for i in range(period * (1 + args.periods)):
    for refresh, (run, _) in steps.items():
      start = time.perf_counter()
      states[refresh] = jax.block_until_ready(run(states[refresh], i % period))
      if i >= period:
        times[refresh].append(time.perf_counter() - start)
  return times


def bench(name: str, args: argparse.Namespace) -> dict:
  config = models.DEFAULTS[name]
  problem = step_time.make_problem(name, config)
  times = time_periods({**kfax_steps(problem, args), 'sgd': sgd_step(problem)}, args)
  row = {'model': name, 'config': str(config), 'sgd_s': statistics.median(times.pop('sgd'))}
  for refresh, ts in times.items():
    row[refresh] = {'median_s': statistics.median(ts), 'max_s': max(ts),
                    'mean_s': statistics.fmean(ts), 'times_s': ts}
  return row


def table(rows: list[dict], args: argparse.Namespace) -> list[str]:
  head = ('| model | SGD ms | together: median / slowest / mean ms | staggered: median / slowest'
          ' / mean ms | slowest, staggered / together |')
  lines = [head, '|' + '---|' * 5]
  for r in rows:
    cells = [f'{r[k]["median_s"] * 1e3:.1f} / {r[k]["max_s"] * 1e3:.1f} /'
             f' {r[k]["mean_s"] * 1e3:.1f}' for k in REFRESHES]
    ratio = r['staggered']['max_s'] / r['together']['max_s']
    lines.append(f'| {r["model"]} | {r["sgd_s"] * 1e3:.1f} | {cells[0]} | {cells[1]} |'
                 f' {ratio:.2f} |')
  return lines


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='resnet18,resnet50')
  p.add_argument('--mode', choices=('eigen', 'factored'), default='eigen')
  p.add_argument('--inverse_every', type=int, default=10)
  p.add_argument('--periods', type=int, default=3, help='timed periods per setting')
  p.add_argument('--damping', type=float, default=1e-3)
  p.add_argument('--out', default=str(RESULTS / 'refresh_spread.json'))
  args = p.parse_args(argv)
  flags = sys.argv[1:] if argv is None else argv
  command = ' '.join(['python benchmarks/refresh_spread.py', *flags])
  rows = [bench(name.strip(), args) for name in args.models.split(',')]
  lines = table(rows, args)
  print('\n'.join(lines))
  meta = (f'{datetime.date.today()}, jax {jax.__version__}, {jax.devices()[0].device_kind},'
          f' {os.cpu_count()} cores, damping_mode={args.mode}, inverse_every={args.inverse_every},'
          f' {args.periods} periods timed, load average {os.getloadavg()[0]:.1f}')
  Path(args.out).write_text(json.dumps({'meta': meta, 'args': vars(args), 'rows': rows},
                                       indent=2))
  Path(args.out).with_suffix('.md').write_text(
      f'# Slowest step of a refresh period\n\n`{command}`\n\n{meta}\n\n' + '\n'.join(lines)
      + '\n')


if __name__ == '__main__':
  main()
