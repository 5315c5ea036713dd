"""kfax under Flax NNX against Flax linen: the digits MLP and CNN of `examples/digits.py`.

Both APIs train the same models (`digits.MODELS`, `digits.NNX_MODELS`) through the example's own
loop (`digits.train`) with kfax's defaults there (`digits.KFAC_DEFAULTS`: K-FAC + SGD with
momentum, statistics every 5 steps, MC Fisher, refresh every 10 updates) for `--steps` steps on
`--seeds` seeds; the seed sets the initialization, the data order and the MC samples. Three arms:

- `linen`: `python examples/digits.py`;
- `nnx`: `python examples/digits.py --api nnx` (its own initialization from `nnx.Rngs`);
- `nnx, linen init`: the NNX model holding linen's initial parameters for that seed. Everything
  else is the same as linen's run, so any difference beyond float rounding would be kfax's NNX
  front-end computing other gradients or statistics than its linen one.

Reported: test accuracy at `--at` steps and after `--steps`, and the steps to the 97% target
(first evaluation, every 10 steps, at or above it), medians over seeds.

Step time. The example's jitted steps (`digits.init`: linen's `jax.jit` over params, NNX's
`jax.jit` over the pure dict of `nnx.split((model, optimizer))`'s state) are compiled and
warmed up, then timed in interleaved rounds: each round runs, for every series in a rotating
order, one block of lcm(stats_every, inverse_every) = 10 steps with `jax.block_until_ready`
after each step (giving the stats step with a refresh (step 0), the stats step (step 5) and the
plain steps), then one more block dispatched back to back and blocked once at the end: the
amortized step, block time / 10, as the training loop runs it. Medians over `--rounds` rounds;
compilation excluded. Three more series show what the example's way saves: the same NNX steps
under `jax.jit` over the `nnx.State` itself (`nnx, nnx.State`), under `nnx.jit` of (model,
optimizer) (`nnx, nnx.jit`) and through `nnx.cached_partial` (`nnx, nnx.cached_partial`). Every
series feeds one fixed batch (numpy, as `digits.train` does) and one fixed MC key. Also
reported: XLA's FLOP count of each compiled step, and the number of pytree leaves of the
example steps' arguments and the time to flatten them (part of every call's dispatch).

Run (about 4 minutes on 2 busy CPU cores):

    python benchmarks/nnx_vs_linen.py
    python benchmarks/nnx_vs_linen.py --models mlp --seeds 1 --rounds 20 --md /tmp/n.md

Writes benchmarks/results/nnx_vs_linen.md.
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS (README)

import argparse
import datetime
import functools
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx

import kfax

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / 'results'


def _load(name: str, path: Path) -> Any:
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Flax dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


sys.path.insert(0, str(ROOT / 'benchmarks'))
race = _load('kfax_race_benchmark', ROOT / 'benchmarks' / 'race.py')  # kfax_source
digits = race.digits  # examples/digits.py, loaded once

DEFAULTS = digits.KFAC_DEFAULTS
BLOCK = math.lcm(DEFAULTS['stats_every'], DEFAULTS['inverse_every'])  # steps; step 0 refreshes
# Which linen layer each NNX attribute is (`nnx, linen init`).
LINEN_NAMES = {'mlp': {'dense1': 'Dense_0', 'dense2': 'Dense_1', 'dense3': 'Dense_2'},
               'cnn': {'conv1': 'Conv_0', 'conv2': 'Conv_1', 'dense': 'Dense_0'}}
ARMS = ('linen', 'nnx', 'nnx, linen init')

# ---------------------------------------------------------------------------------- training


def linen_init(name: str, seed: int, data: digits.Data) -> Callable[..., nnx.Module]:
  """An NNX model class stand-in (`cls(rngs=...)`) whose model holds the parameters that
  `digits.train` initializes the linen model with for `seed`."""
  init_key = jax.random.split(jax.random.key(seed))[0]  # as digits.train splits it
  params = digits.MODELS[name]().init(init_key, data['x_test'][:1])['params']

  def build(*, rngs: nnx.Rngs) -> nnx.Module:
    model = digits.NNX_MODELS[name](rngs=rngs)
    for attr, linen_name in LINEN_NAMES[name].items():
      layer = getattr(model, attr)
      layer.kernel.value = params[linen_name]['kernel']
      layer.bias.value = params[linen_name]['bias']
    return model

  return build


def accuracy_runs(name: str, data: digits.Data, args: argparse.Namespace) -> dict[str, list]:
  """`digits.train` of every arm on every seed, the arms in a rotating order."""
  first = data['x_train'][:digits.BATCH_SIZE], data['y_train'][:digits.BATCH_SIZE]
  tables = {api: digits.layer_table(m, *first)
            for api, m in (('linen', digits.MODELS[name]()), ('nnx', digits.NNX_MODELS[name]))}
  runs = {arm: [] for arm in ARMS}
  for seed in range(args.seeds):
    models = {'linen': digits.MODELS[name](), 'nnx': digits.NNX_MODELS[name],
              'nnx, linen init': linen_init(name, seed, data)}
    for arm in ARMS[seed % 3:] + ARMS[:seed % 3]:
      tx = digits.kfac_optimizer(tables['linen' if arm == 'linen' else 'nnx'])
      result = digits.train(models[arm], tx, data, steps=args.steps, seed=seed,
                            stats_every=DEFAULTS['stats_every'], fisher=DEFAULTS['fisher'])
      history = dict(result['history'])
      runs[arm].append({'seed': seed, 'steps_to_target': result['steps_to_target'] or math.inf,
                        'at': history.get(args.at, math.nan),
                        'final': result['final_accuracy'], 'history': result['history']})
    print(f'  {name} seed {seed}: ' + ', '.join(
        f'{arm} {runs[arm][-1]["steps_to_target"]} steps, acc@{args.at} {runs[arm][-1]["at"]:.4f}'
        for arm in ARMS), flush=True)
  return runs


# --------------------------------------------------------------------------------- step time


def example_series(model: Any, tx: Any, x: np.ndarray, y: np.ndarray,
                   key: jax.Array) -> tuple[Callable[[bool], Any], dict[str, Any]]:
  """`step(stats) -> loss` over the example's own jitted steps and carry (`digits.init`), and
  what the steps cost to dispatch and to run (leaves, flatten time, XLA FLOPs)."""
  carry, (stats_step, plain_step, _) = digits.init(model, tx, jax.random.key(0), x,
                                                   DEFAULTS['fisher'])
  box = list(carry)

  def step(stats: bool) -> Any:
    out = stats_step(*box, x, y, key) if stats else plain_step(*box, x, y)
    box[:] = out[:-1]
    return out[-1]

  flops = lambda f, *a: _flops(f.lower(*box, *a).compile())
  flatten = min(_seconds(lambda: jax.tree.flatten(box)) for _ in range(200))
  return step, {'leaves': len(jax.tree.leaves(box)), 'flatten_us': 1e6 * flatten,
                'stats_gflop': flops(stats_step, x, y, key) / 1e9,
                'plain_gflop': flops(plain_step, x, y) / 1e9}


def alternative_series(cls: Any, tx: Any, x: np.ndarray, y: np.ndarray, key: jax.Array,
                       how: str) -> Callable[[bool], Any]:
  """The steps of `digits.make_nnx_steps`, jitted another way: `nnx.jit` of (model, optimizer),
  called directly or through `nnx.cached_partial` (the usual NNX ways), or `jax.jit` over the
  `nnx.State` of `nnx.split` rather than its pure dict."""
  model = cls(rngs=nnx.Rngs(jax.random.key(0)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  grad_fn = kfax.value_grad_and_stats(digits.nnx_loss, fisher=DEFAULTS['fisher'])

  def stats_step(model, optimizer, x, y, key):
    loss, grads, stats = grad_fn(model, x, y, rng=key)
    optimizer.update(model, grads, stats=stats)
    return loss

  def plain_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(digits.nnx_loss)(model, x, y)
    optimizer.update(model, grads, stats=None)
    return loss

  if how == 'nnx.State':
    graphdef, state = nnx.split((model, optimizer))
    box = [state]

    def over_state(f: Callable) -> Callable:
      @jax.jit
      def jitted(state, *args):
        model, optimizer = nnx.merge(graphdef, state)
        loss = f(model, optimizer, *args)
        return nnx.state((model, optimizer)), loss

      def call(*args):
        box[0], loss = jitted(box[0], *args)
        return loss
      return call

    stats_step, plain_step = over_state(stats_step), over_state(plain_step)
  else:
    bind = nnx.cached_partial if how == 'nnx.cached_partial' else functools.partial
    stats_step, plain_step = (bind(nnx.jit(f), model, optimizer) for f in (stats_step, plain_step))
  return lambda stats: stats_step(x, y, key) if stats else plain_step(x, y)


def _seconds(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _flops(compiled: Any) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', math.nan))


def step_times(name: str, data: digits.Data, args: argparse.Namespace) -> dict[str, dict]:
  """Median ms of the stats step with a refresh, the stats step, the plain step and the
  amortized step of each series, timed in interleaved rounds (module docstring)."""
  x, y = data['x_train'][:digits.BATCH_SIZE], data['y_train'][:digits.BATCH_SIZE]
  key = jax.random.key(1)
  linen, cls = digits.MODELS[name](), digits.NNX_MODELS[name]
  tables = {'linen': digits.layer_table(linen, x, y), 'nnx': digits.layer_table(cls, x, y)}
  series, info = {}, {}
  series['linen'], info['linen'] = example_series(
      linen, digits.kfac_optimizer(tables['linen']), x, y, key)
  series['nnx'], info['nnx'] = example_series(cls, digits.kfac_optimizer(tables['nnx']), x, y,
                                              key)
  for how in ('nnx.State', 'nnx.jit', 'nnx.cached_partial'):
    series[f'nnx, {how}'] = alternative_series(cls, digits.kfac_optimizer(tables['nnx']), x, y,
                                               key, how)
  phase = lambda i: i % DEFAULTS['stats_every'] == 0
  for step in series.values():  # compile, then warm up: whole blocks keep step 0 the refresh
    for i in range(2 * BLOCK):
      jax.block_until_ready(step(phase(i)))

  samples = {s: {'refresh': [], 'stats': [], 'plain': [], 'amortized': []} for s in series}
  names = list(series)
  for r in range(args.rounds):
    for s in names[r % len(names):] + names[:r % len(names)]:
      step, out = series[s], samples[s]
      for i in range(BLOCK):
        t = 1e3 * _seconds(lambda: step(phase(i)))
        out['refresh' if i == 0 else 'stats' if phase(i) else 'plain'].append(t)
      start = time.perf_counter()
      for i in range(BLOCK):
        loss = step(phase(i))
      jax.block_until_ready(loss)
      out['amortized'].append(1e3 * (time.perf_counter() - start) / BLOCK)
  return {s: {**{k: statistics.median(v) for k, v in out.items()}, **info.get(s, {})}
          for s, out in samples.items()}


# ------------------------------------------------------------------------------------ output


def fmt(value: float, spec: str) -> str:
  return '-' if math.isinf(value) or math.isnan(value) else format(value, spec)


def model_lines(name: str, runs: dict[str, list], times: dict[str, dict],
                args: argparse.Namespace) -> list[str]:
  median = lambda arm, k: statistics.median(r[k] for r in runs[arm])
  lines = [f'### {name}', '',
           f'| API | acc@{args.at} (median) | acc@{args.steps} (median) | steps to 97% (median) |'
           ' per seed | reached |', '|---|---|---|---|---|---|']
  for arm in ARMS:
    per_seed = ', '.join(fmt(r['steps_to_target'], '.0f') for r in runs[arm])
    lines.append(f'| {arm} | {median(arm, "at"):.4f} | {median(arm, "final"):.4f} |'
                 f' {fmt(median(arm, "steps_to_target"), ".0f")} | {per_seed} |'
                 f' {sum(math.isfinite(r["steps_to_target"]) for r in runs[arm])}/{args.seeds} |')
  gaps = [max(abs(a - b) for (_, a), (_, b) in zip(r['history'], q['history']))
          for r, q in zip(runs['linen'], runs['nnx, linen init'])]
  lines += ['', f'`nnx, linen init` against `linen`: largest test-accuracy difference at any'
            f' evaluation, per seed: {", ".join(f"{d:.4f}" for d in gaps)}.', '',
            '| step series | refresh step ms | stats step ms | plain step ms | amortized ms |'
            ' ratio to linen (refresh / stats / plain / amortized) |', '|---|---|---|---|---|---|']
  keys = ('refresh', 'stats', 'plain', 'amortized')
  for s, t in times.items():
    ratios = ' / '.join(f'{t[k] / times["linen"][k]:.2f}' for k in keys)
    lines.append(f'| {s} | ' + ' | '.join(f'{t[k]:.3f}' for k in keys) + f' | {ratios} |')
  steps = {arm: median(arm, 'steps_to_target') for arm in ('linen', 'nnx')}
  amortized = times['nnx']['amortized'] / times['linen']['amortized']
  same = 'equals' if max(gaps) == 0 else f'differs (by up to {max(gaps):.4f}) from'
  lines += ['', f'Steps to 97% (median): NNX {fmt(steps["nnx"], ".0f")}, linen'
            f' {fmt(steps["linen"], ".0f")} from their own initializations; from linen\'s, NNX\'s'
            f' test accuracy {same} linen\'s at every evaluation. Amortized step NNX/linen'
            f' {amortized:.2f} (target: within 10%, {"met" if amortized <= 1.1 else "NOT met"}).']
  lines += ['', '| compiled step | arguments: leaves | flatten µs | stats step GFLOP |'
            ' plain step GFLOP |', '|---|---|---|---|---|']
  for s in ('linen', 'nnx'):
    t = times[s]
    lines.append(f'| {s} | {t["leaves"]} | {t["flatten_us"]:.1f} | {t["stats_gflop"]:.4f} |'
                 f' {t["plain_gflop"]:.4f} |')
  return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='mlp,cnn', help='comma-separated: mlp, cnn')
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--steps', type=int, default=150, help='training steps of every run')
  p.add_argument('--at', type=int, default=30, help='also report the test accuracy here')
  p.add_argument('--rounds', type=int, default=100, help='interleaved timing rounds')
  p.add_argument('--md', default=str(RESULTS / 'nnx_vs_linen.md'))
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  start = time.perf_counter()
  env = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'load_start': os.getloadavg()[0], 'source': race.kfax_source()}
  print(f'jax {jax.__version__}, flax {flax.__version__}, kfax {kfax.__version__} on'
        f' {jax.devices()[0].device_kind}, {env["date"]}', flush=True)
  data = digits.load_data()
  sections = []
  for name in args.models.split(','):
    runs = accuracy_runs(name, data, args)
    times = step_times(name, data, args)
    section = model_lines(name, runs, times, args)
    print('\n'.join(section), flush=True)
    sections += section + ['']
  src, wall = env['source'], time.perf_counter() - start
  command = ' '.join(['python benchmarks/nnx_vs_linen.py'] + (sys.argv[1:] if argv is None
                                                              else argv))
  lines = ['# kfax on Flax NNX vs Flax linen: digits MLP and CNN', '',
           f'`{command}`, jax {jax.__version__}, flax {flax.__version__}, kfax {kfax.__version__}'
           f' (commit {src.get("commit")}{" with kfax/ modified" if src.get("modified") else ""},'
           f' sources sha256 {src["sha256_12"]}), {os.cpu_count()} CPU cores, {env["date"]},'
           f' {wall:.0f} s, load average {env["load_start"]:.1f} at the start and'
           f' {os.getloadavg()[0]:.1f} at the end.', '',
           'kfax: `examples/digits.py` defaults (`optax.chain(kfax.kfac(table, damping=1e-4,'
           ' damping_mode="factored", norm_constraint=1e-3, ema_decay=0.95, inverse_every=10),'
           f' optax.sgd(0.1, momentum=0.9))`, MC Fisher statistics every'
           f' {DEFAULTS["stats_every"]} steps), batch {digits.BATCH_SIZE}, {args.steps} steps,'
           f' evaluation every 10 steps on the 360 test images, seeds 0-{args.seeds - 1}.'
           ' Step times: medians of'
           f' {args.rounds} interleaved rounds of {BLOCK}-step blocks (see the script); the refresh'
           ' step is the stats step whose update also refreshes the eigendecompositions, the'
           f' amortized step a {BLOCK}-step block dispatched back to back, divided by {BLOCK}.', '',
           *sections]
  text = '\n'.join(lines)
  print('\n' + text)
  Path(args.md).parent.mkdir(parents=True, exist_ok=True)
  Path(args.md).write_text(text)
  print(f'wrote {args.md} ({wall:.0f} s)')


if __name__ == '__main__':
  main()
