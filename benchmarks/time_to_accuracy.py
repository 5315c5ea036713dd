"""Steps and seconds to a target test accuracy: SGD with momentum, Adam and kfax, small grids.

Tasks (no download): scikit-learn's bundled digits (8x8 images, 10 classes; the MLP and CNN of
`examples/digits.py`) and a harder synthetic 10-class problem from
`sklearn.datasets.make_classification` (64 features, 3 clusters per class, 5% flipped labels;
the same MLP). Each optimizer runs a small learning-rate grid (and a damping grid for kfax) over
a few seeds; a run's clock counts its jitted training steps only (compiled before the clock
starts; evaluation every `--eval_every` steps is not timed). For each configuration the table
gives the median over seeds of the steps and seconds to the target (a seed that never reaches it
counts as infinite), and the best configuration of each optimizer (fewest median steps, then
fewest seconds). kfax uses `examples/digits.py`'s steps and defaults (damping mode, norm
constraint, periods): statistics (MC Fisher) every `--stats_every` steps, `kfax.kfac` +
`optax.sgd(lr, momentum=0.9)`. Data order comes from `digits.batch_indices`.

Run (about 3 minutes on 2 CPU cores):

    python benchmarks/time_to_accuracy.py
    python benchmarks/time_to_accuracy.py --tasks digits-mlp,digits-cnn --seeds 5

Writes benchmarks/results/time_to_accuracy.json and time_to_accuracy.png (needs matplotlib).
"""

from __future__ import annotations

import os

# One OpenBLAS thread: its threads oversubscribe the cores beside XLA's pool and make CPU
# Cholesky / eigh steps 10-50x slower under load (README.md); kfac-jax uses the same LAPACK.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
import dataclasses
import datetime
import importlib.util
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfax

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / 'results'


def load_digits_example() -> Any:
  """`examples/digits.py` as a module (data loading, models, kfax step functions)."""
  spec = importlib.util.spec_from_file_location('kfax_digits_example', ROOT / 'examples' /
                                                'digits.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Flax dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


digits = load_digits_example()
BATCH_SIZE = digits.BATCH_SIZE


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  model: str  # a key of digits.MODELS
  target: float
  max_steps: int


TASKS = {
    'digits-mlp': Task('digits-mlp', 'mlp', 0.97, 500),
    'digits-cnn': Task('digits-cnn', 'cnn', 0.97, 500),
    'synthetic-mlp': Task('synthetic-mlp', 'mlp', 0.62, 600),  # peaks: 0.62-0.65 (MLP overfits)
}


def synthetic_data(seed: int = 0) -> dict[str, np.ndarray]:
  """A 10-class, 64-feature problem shaped like digits ((N, 8, 8, 1), standardized)."""
  from sklearn.datasets import make_classification
  from sklearn.model_selection import train_test_split

  x, y = make_classification(
      n_samples=4000, n_features=64, n_informative=24, n_redundant=16, n_classes=10,
      n_clusters_per_class=3, class_sep=1.5, flip_y=0.05, random_state=seed)
  x = ((x - x.mean(0)) / x.std(0)).astype(np.float32).reshape(-1, 8, 8, 1)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y.astype(np.int32), test_size=800, stratify=y, random_state=seed)
  return {'x_train': x_train, 'y_train': y_train, 'x_test': x_test, 'y_test': y_test}


def task_data(task: Task) -> dict[str, np.ndarray]:
  return synthetic_data() if task.name.startswith('synthetic') else digits.load_data()


# ------------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class Config:
  optimizer: str  # 'sgd', 'adam' or 'kfax'
  learning_rate: float
  damping: float | None = None

  def label(self) -> str:
    damping = f', damping {self.damping:g}' if self.damping is not None else ''
    return f'{self.optimizer} lr {self.learning_rate:g}{damping}'


def grid(args: argparse.Namespace) -> list[Config]:
  floats = lambda s: [float(v) for v in s.split(',')]
  return ([Config('sgd', lr) for lr in floats(args.sgd_lrs)]
          + [Config('adam', lr) for lr in floats(args.adam_lrs)]
          + [Config('kfax', lr, d) for lr, d in itertools.product(floats(args.kfax_lrs),
                                                                   floats(args.dampings))])


def transform(config: Config, args: argparse.Namespace, task: Task,
              data: dict) -> optax.GradientTransformation:
  if config.optimizer == 'sgd':
    return optax.sgd(config.learning_rate, momentum=0.9)
  if config.optimizer == 'adam':
    return optax.adam(config.learning_rate)
  model = digits.MODELS[task.model]()
  table = digits.layer_table(model, data['x_train'][:BATCH_SIZE], data['y_train'][:BATCH_SIZE])
  return digits.kfac_optimizer(table, config.learning_rate, damping=config.damping,
                               damping_mode=args.damping_mode,
                               norm_constraint=args.norm_constraint,
                               inverse_every=args.inverse_every)


# --------------------------------------------------------------------------------- training


def train(steps: tuple[Callable, Callable, Callable], tx: optax.GradientTransformation,
          task: Task, data: dict, seed: int, stats_every: int | None,
          eval_every: int) -> list[tuple[int, float, float]]:
  """(step, training seconds, test accuracy) every `eval_every` steps up to `task.max_steps`."""
  stats_step, plain_step, accuracy = steps
  model = digits.MODELS[task.model]()
  init_key, stats_key = jax.random.split(jax.random.key(seed))
  x_test, y_test = jnp.asarray(data['x_test']), jnp.asarray(data['y_test'])
  params = model.init(init_key, x_test[:1])['params']
  opt_state = tx.init(params)
  plan = digits.batch_indices(len(data['y_train']), task.max_steps, BATCH_SIZE, seed)

  def step(i, params, opt_state):
    x, y = data['x_train'][plan[i]], data['y_train'][plan[i]]
    if stats_every is not None and i % stats_every == 0:
      return stats_step(params, opt_state, x, y, jax.random.fold_in(stats_key, i))
    return plain_step(params, opt_state, x, y)

  history, elapsed, i = [], 0.0, 0
  while i < task.max_steps:
    start = time.perf_counter()
    for _ in range(min(eval_every, task.max_steps - i)):
      params, opt_state, _ = step(i, params, opt_state)
      i += 1
    jax.block_until_ready(params)
    elapsed += time.perf_counter() - start
    history.append((i, elapsed, float(accuracy(params, x_test, y_test))))
  return history


def compile_steps(model_name: str, tx: optax.GradientTransformation, data: dict,
                  fisher: str) -> tuple[tuple[Callable, Callable, Callable], float]:
  """`digits.make_steps` for this optimizer, each function compiled by one throwaway call."""
  start = time.perf_counter()
  model = digits.MODELS[model_name]()
  steps = digits.make_steps(model, tx, fisher)
  x, y = jnp.asarray(data['x_train'][:BATCH_SIZE]), jnp.asarray(data['y_train'][:BATCH_SIZE])
  params = model.init(jax.random.key(0), x[:1])['params']
  state = tx.init(params)
  out = [steps[1](params, state, x, y), steps[2](params, x, y)]
  if isinstance(state, tuple) and any(isinstance(s, kfax.KfacState) for s in state):
    out.append(steps[0](params, state, x, y, jax.random.key(0)))
  jax.block_until_ready(out)
  return steps, time.perf_counter() - start


def reached(history: list[tuple[int, float, float]], target: float) -> tuple[float, float]:
  """(steps, seconds) at the first evaluation at or above `target`, else (inf, inf)."""
  for step, seconds, acc in history:
    if acc >= target:
      return step, seconds
  return math.inf, math.inf


def run_config(config: Config, task: Task, data: dict, args: argparse.Namespace) -> dict:
  tx = transform(config, args, task, data)
  steps, compile_s = compile_steps(task.model, tx, data, args.fisher)
  stats_every = args.stats_every if config.optimizer == 'kfax' else None
  runs = []
  for seed in range(args.seeds):
    history = train(steps, tx, task, data, seed, stats_every, args.eval_every)
    n, s = reached(history, task.target)
    runs.append({'seed': seed, 'steps_to_target': n, 'seconds_to_target': s,
                 'final_accuracy': history[-1][2], 'history': history})
  return {**dataclasses.asdict(config), 'label': config.label(), 'compile_s': compile_s,
          'median_steps': statistics.median(r['steps_to_target'] for r in runs),
          'median_seconds': statistics.median(r['seconds_to_target'] for r in runs),
          'median_final_accuracy': statistics.median(r['final_accuracy'] for r in runs),
          'runs': runs}


def best(rows: list[dict], optimizer: str) -> dict:
  mine = [r for r in rows if r['optimizer'] == optimizer]
  return min(mine, key=lambda r: (r['median_steps'], r['median_seconds']))


def verdict(rows: list[dict]) -> dict[str, Any]:
  """Whether kfax's best config needs fewer steps and no more seconds than SGD's and Adam's."""
  kfax_best = best(rows, 'kfax')
  first_order = [r for r in rows if r['optimizer'] in ('sgd', 'adam')]
  fewest_steps = min(r['median_steps'] for r in first_order)
  fewest_seconds = min(r['median_seconds'] for r in first_order)
  return {'kfax_steps': kfax_best['median_steps'], 'kfax_seconds': kfax_best['median_seconds'],
          'first_order_fewest_steps': fewest_steps,
          'first_order_fewest_seconds': fewest_seconds,
          'fewer_steps': kfax_best['median_steps'] < fewest_steps,
          'no_more_seconds': kfax_best['median_seconds'] <= fewest_seconds}


# ----------------------------------------------------------------------------------- output


def fmt(value: float, spec: str) -> str:
  return '-' if math.isinf(value) else format(value, spec)


def print_table(task: Task, rows: list[dict], args: argparse.Namespace) -> None:
  print(f'\n{task.name}: target test accuracy {task.target:.0%}, median of {args.seeds} seeds,'
        f' at most {task.max_steps} steps')
  print('| config | steps to target | seconds to target | final accuracy | best |')
  print('|---|---|---|---|---|')
  winners = {id(best(rows, o)) for o in ('sgd', 'adam', 'kfax')}
  for r in rows:
    print(f'| {r["label"]} | {fmt(r["median_steps"], ".0f")} | {fmt(r["median_seconds"], ".3f")}'
          f' | {r["median_final_accuracy"]:.4f} | {"*" if id(r) in winners else ""} |')
  v = verdict(rows)
  print(f'kfax best: {fmt(v["kfax_steps"], ".0f")} steps, {fmt(v["kfax_seconds"], ".3f")} s;'
        f' best of SGD/Adam: {fmt(v["first_order_fewest_steps"], ".0f")} steps,'
        f' {fmt(v["first_order_fewest_seconds"], ".3f")} s -> fewer steps: {v["fewer_steps"]},'
        f' no more seconds: {v["no_more_seconds"]}')


def pyplot() -> Any:
  """matplotlib's pyplot on the Agg backend, or None (saying so) where matplotlib is missing."""
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    print('matplotlib not installed: no plot')
    return None
  return plt


def plot(results: dict[str, Any], path: Path) -> bool:
  """Test accuracy vs training seconds, best config of each optimizer, every seed."""
  plt = pyplot()
  if plt is None:
    return False
  tasks = list(results)
  fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
  colors = {'sgd': 'tab:blue', 'adam': 'tab:orange', 'kfax': 'tab:green'}
  for ax, name in zip(axes[0], tasks):
    rows = results[name]['configs']
    for optimizer, color in colors.items():
      row = best(rows, optimizer)
      for run in row['runs']:
        _, seconds, acc = zip(*run['history'])
        ax.plot(seconds, acc, color=color, alpha=0.8, lw=1,
                label=row['label'] if run['seed'] == 0 else None)
    ax.axhline(results[name]['target'], color='gray', ls='--', lw=0.8)
    ax.set(title=name, xlabel='training seconds (steps only)', ylabel='test accuracy',
           ylim=(max(0.0, results[name]['target'] - 0.3), 1.0))
    ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


def finite(tree: Any) -> Any:
  """`tree` with infinite floats (target never reached) as None, for strict JSON."""
  if isinstance(tree, dict):
    return {k: finite(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [finite(v) for v in tree]
  return None if isinstance(tree, float) and math.isinf(tree) else tree


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tasks', default='digits-mlp,synthetic-mlp', help=f'from {",".join(TASKS)}')
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--eval_every', type=int, default=10)
  p.add_argument('--sgd_lrs', default='0.03,0.1,0.3')
  p.add_argument('--adam_lrs', default='0.001,0.003,0.01')
  p.add_argument('--kfax_lrs', default='0.03,0.1,0.3')
  p.add_argument('--dampings', default='0.0001,0.001', help='kfax damping grid')
  p.add_argument('--norm_constraint', type=float,
                 default=digits.KFAC_DEFAULTS.get('norm_constraint'),
                 help='kfax norm constraint (examples/digits.py default)')
  p.add_argument('--damping_mode', choices=('eigen', 'factored'),
                 default=digits.KFAC_DEFAULTS['damping_mode'])
  p.add_argument('--stats_every', type=int, default=digits.KFAC_DEFAULTS['stats_every'])
  p.add_argument('--inverse_every', type=int, default=digits.KFAC_DEFAULTS['inverse_every'])
  p.add_argument('--fisher', choices=('mc', 'empirical'), default=digits.KFAC_DEFAULTS['fisher'])
  p.add_argument('--max_steps', type=int, help='override every task\'s step budget')
  p.add_argument('--out', default=str(RESULTS / 'time_to_accuracy.json'))
  p.add_argument('--plot', default=str(RESULTS / 'time_to_accuracy.png'))
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  start = time.perf_counter()
  env = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'jax': jax.__version__, 'device_kind': jax.devices()[0].device_kind,
         'cpu_count': os.cpu_count(), 'load_average_start': os.getloadavg()[0]}
  print(f'jax {env["jax"]} on {env["device_kind"]}, {env["date"]}; kfax {args.damping_mode},'
        f' norm constraint {args.norm_constraint},'
        f' stats every {args.stats_every}, refresh every {args.inverse_every}, fisher'
        f' {args.fisher}', flush=True)
  results = {}
  for name in args.tasks.split(','):
    task = TASKS[name]
    if args.max_steps:
      task = dataclasses.replace(task, max_steps=args.max_steps)
    data = task_data(task)
    rows = []
    for config in grid(args):
      rows.append(run_config(config, task, data, args))
      print(f'  {name} {config.label()}: median steps {fmt(rows[-1]["median_steps"], ".0f")},'
            f' seconds {fmt(rows[-1]["median_seconds"], ".3f")}', flush=True)
    results[name] = {'target': task.target, 'max_steps': task.max_steps, 'configs': rows,
                     'verdict': verdict(rows)}
    print_table(task, rows, args)
  env['load_average_end'] = os.getloadavg()[0]
  env['wall_s'] = time.perf_counter() - start
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(finite({'environment': env, 'settings': vars(args), 'results': results}), f)
  if plot(results, Path(args.plot)):
    print(f'wrote {args.plot}')
  print(f'wrote {args.out} ({env["wall_s"]:.0f} s)')


if __name__ == '__main__':
  main()
