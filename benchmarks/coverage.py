"""Steps and seconds to a target for two models that the layer-table kfax newly covers, vs Adam.

- `lm-sort`: a tiny causal transformer language model (linen `nn.Embed`, learned positions,
  2 pre-LayerNorm blocks of `nn.MultiHeadDotProductAttention` with a causal mask and a GELU MLP,
  a final `nn.LayerNorm`, logits from the tied `Embed.attend`; width 32, 2 heads). Each sequence
  is 8 random tokens (vocabulary 16), a separator, then the same tokens sorted; the model reads
  the sequence shifted by one and the loss, `kfax.softmax_cross_entropy(..., where=mask)`, counts
  only the 8 sorted positions. Target: masked token accuracy on 512 held-out sequences.
- `digits-resnet`: a BatchNorm ResNet (a 3x3 conv stem and 3 residual blocks of conv+BatchNorm,
  16-32 channels, one stride-2 block with a 1x1 projection, global average pooling, a Dense head;
  `batch_stats` mutable in training, running averages in evaluation) on scikit-learn's bundled
  digits (8x8 images, no download; the split of `examples/digits.py`: 360 test images).

What kfax does with each parameter is printed by `kfax.summary` (`--summary`): attention's
query/key/value/out (DenseGeneral), the MLP, and the tied embedding get Kronecker factors, the
LayerNorm and BatchNorm scales and biases unit-wise 2x2 blocks, the learned positions the
diagonal fallback.

kfax runs with its defaults, `optax.chain(kfax.kfac(table), optax.sgd(lr, momentum=0.9))`
(factored damping 1e-4, norm constraint 1e-3, refresh every 10 updates, EMA 0.95), statistics
(MC Fisher, `sequence="expand"`) every `--stats_every` steps and `stats=None` on the others.
Adam is `optax.adam(lr)`. Each runs a small learning-rate grid, every configuration on
`--seeds` seeds (the seed sets the initialization, the data order and the MC samples). The table
gives, per configuration, the median over seeds of the steps and the seconds to the target (a
seed that never reaches it counts as infinite, '-'), the mean step time and the best test
accuracy seen; the best configuration of each optimizer (*) has the fewest median steps, then
the fewest median seconds.

Timing: `race.py`'s loop (its tasks, compiled steps, interleaved runs and clock; no time cap
here). The learning rate lives in the optimizer state, so each optimizer has one step function
per task, compiled ahead of time with the train state donated; every run of a task advances
`--eval_every` steps in turn, and a run's clock counts only its chunks of steps. A run stops at
the first evaluation at or above the target, at a non-finite loss, or at the task's step
budget. kfax's `skipped_stats` and `failed_refreshes` counters are recorded at the end of every
run.

Run (about 3 minutes on 2 busy CPU cores, compiles included; results in
benchmarks/results/coverage.md and .json):

    python benchmarks/coverage.py
    python benchmarks/coverage.py --stats_every 1 \
        --out benchmarks/results/coverage_stats_every_1.json \
        --md benchmarks/results/coverage_stats_every_1.md
    python benchmarks/coverage.py --tasks lm-sort --summary --out /tmp/c.json --md /tmp/c.md
"""

from __future__ import annotations

import os

# One OpenBLAS thread: its threads oversubscribe the cores beside XLA's pool and make CPU
# Cholesky / eigh steps 10-50x slower under load (README.md).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kfax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
import race  # noqa: E402  (the tasks' loop: Arena, Config, run_configs)
import time_to_accuracy  # noqa: E402  (its `finite`)

RESULTS = Path(__file__).resolve().parent / 'results'

SORT_VOCAB, SORT_LENGTH = 16, 8  # tokens 0..15, separator 16


def sort_sequences(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
  """(inputs, targets, mask), each (n, 2 * SORT_LENGTH): `x SEP sorted(x)` shifted by one; the
  mask is true where the target is one of the sorted tokens."""
  x = rng.integers(0, SORT_VOCAB, (n, SORT_LENGTH))
  seq = np.concatenate([x, np.full((n, 1), SORT_VOCAB), np.sort(x, axis=1)], axis=1)
  mask = np.zeros((n, 2 * SORT_LENGTH), bool)
  mask[:, SORT_LENGTH:] = True
  return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32), mask


def lm_sort_task(batch_size: int = 32, max_steps: int = 500, target: float = 0.95) -> race.Task:
  model = models.TinyLM(vocab=SORT_VOCAB + 1, length=2 * SORT_LENGTH)
  test = sort_sequences(np.random.default_rng(12345), 512)

  def init(seed):
    return model.init(jax.random.key(seed), test[0][:1])['params'], {}

  def loss(params, rest, tokens, targets, mask):
    logits = model.apply({'params': params}, tokens)
    return kfax.softmax_cross_entropy(logits, targets, where=mask), rest

  def accuracy(params, rest, tokens, targets, mask):
    del rest
    right = (jnp.argmax(model.apply({'params': params}, tokens), axis=-1) == targets) & mask
    return jnp.sum(right) / jnp.sum(mask)

  def batches(seed, steps):
    inputs, targets, mask = sort_sequences(np.random.default_rng(1000 + seed), steps * batch_size)
    shape = lambda a: a.reshape((steps, batch_size) + a.shape[1:])
    return shape(inputs), shape(targets), shape(mask)

  return race.Task('lm-sort', 'tiny causal transformer LM, sort 8 tokens, masked loss',
                   'masked token accuracy', True, target, max_steps, batch_size, init, loss,
                   accuracy, batches, test)


TASKS = {'lm-sort': lm_sort_task,
         'digits-resnet': lambda **k: race.resnet_task(**k)}


def run_task(task: race.Task, args: argparse.Namespace) -> dict[str, Any]:
  """kfax (its defaults) and Adam over their grids, every configuration on every seed."""
  arena = race.Arena(task, {})
  if args.summary:
    print(kfax.summary(arena.table))
  floats = lambda s: [float(v) for v in s.split(',')]
  defaults = (('damping', 1e-4), ('stats_every', args.stats_every), ('inverse_every', 10))
  grid = ([race.Config('kfax', lr, defaults) for lr in floats(args.kfax_lrs)]
          + [race.Config('adam', lr) for lr in floats(args.adam_lrs)])
  rows = race.run_configs(arena, grid, list(range(args.seeds)), args.eval_every, math.inf)
  for contestant in ('kfax', 'adam'):  # fewest median steps, then seconds, then best accuracy
    mine = [r for r in rows if r['contestant'] == contestant]
    best = min(mine, key=lambda r: (r['median_steps'], r['median_seconds'],
                                    -r['median_best_metric']))
    for r in mine:
      r['best'] = r is best
  return {'description': task.description, 'target': task.target, 'max_steps': task.max_steps,
          'batch_size': task.batch_size,
          'compile_s': {c: s.compile_s for (c, _), s in arena.compiled.items()},
          'summary': kfax.summary(arena.table), 'configs': rows}


# ----------------------------------------------------------------------------------- output


fmt = race.fmt


def table_lines(name: str, result: dict[str, Any], args: argparse.Namespace) -> list[str]:
  lines = [f'{name}: {result["description"]}; target test accuracy {result["target"]:.0%},'
           f' batch {result["batch_size"]}, at most {result["max_steps"]} steps, evaluation every'
           f' {args.eval_every} steps.', '',
           '| config | steps to target (median) | per seed | seconds to target (median) |'
           ' ms/step | best accuracy (median) | reached | best |',
           '|---|---|---|---|---|---|---|---|']
  for r in result['configs']:
    per_seed = ', '.join(fmt(n, '.0f') for n in r['steps'])
    lines.append(
        f'| {r["label"]} | {fmt(r["median_steps"], ".0f")} | {per_seed} |'
        f' {fmt(r["median_seconds"], ".2f")} | {r["median_ms_per_step"]:.1f} |'
        f' {r["median_best_metric"]:.4f} | {r["reached"]}/{len(r["seeds"])} |'
        f' {"*" if r["best"] else ""} |')
  k, a = (next(r for r in result['configs'] if r['best'] and r['contestant'] == o)
          for o in ('kfax', 'adam'))
  ratio = lambda x, y: '-' if math.isinf(x) or math.isinf(y) else f'{x / y:.2f}'
  lines += ['', f'Best kfax ({k["label"]}) / best Adam ({a["label"]}), medians of'
            f' {len(k["seeds"])} seeds: steps {ratio(k["median_steps"], a["median_steps"])},'
            f' seconds {ratio(k["median_seconds"], a["median_seconds"])}.']
  counters = [r['kfax_counters'] for c in result['configs'] for r in c['runs']
              if r['kfax_counters']]
  bad = [r['stop'] for c in result['configs'] for r in c['runs'] if r['stop'] == 'non-finite loss']
  lines.append(f'kfax runs: {sum(c["skipped_stats"] for c in counters)} skipped statistics,'
               f' {sum(c["failed_refreshes"] for c in counters)} failed refreshes;'
               f' non-finite losses (any optimizer): {len(bad)}.')
  return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tasks', default='lm-sort,digits-resnet', help=f'from {",".join(TASKS)}')
  p.add_argument('--seeds', type=int, default=3, help='seeds of every configuration')
  p.add_argument('--eval_every', type=int, default=10)
  p.add_argument('--stats_every', type=int, default=5, help='kfax statistics period (steps)')
  p.add_argument('--kfax_lrs', default='0.03,0.1,0.3')
  p.add_argument('--adam_lrs', default='0.001,0.003,0.01')
  p.add_argument('--max_steps', type=int, help="override every task's step budget")
  p.add_argument('--summary', action='store_true', help='print kfax.summary of each model')
  p.add_argument('--out', default=str(RESULTS / 'coverage.json'))
  p.add_argument('--md', default=str(RESULTS / 'coverage.md'))
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  start = time.perf_counter()
  env = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'jax': jax.__version__, 'kfax': kfax.__version__,
         'device_kind': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count(),
         'load_average_start': os.getloadavg()[0], 'kfax_source': race.kfax_source()}
  print(f'jax {env["jax"]} on {env["device_kind"]}, {env["date"]}; kfax defaults, statistics'
        f' every {args.stats_every} steps (MC Fisher)', flush=True)
  results = {}
  for name in args.tasks.split(','):
    task = TASKS[name]() if not args.max_steps else TASKS[name](max_steps=args.max_steps)
    results[name] = run_task(task, args)
  env['load_average_end'] = os.getloadavg()[0]
  env['wall_s'] = time.perf_counter() - start
  src = env['kfax_source']
  command = ' '.join(['python benchmarks/coverage.py'] + (sys.argv[1:] if argv is None else argv))
  lines = ['# kfax coverage: steps to target on a transformer LM and a BatchNorm ResNet', '',
           f'`{command}`,'
           f' jax {env["jax"]}, kfax {env["kfax"]} (commit {src.get("commit")}'
           f'{" with kfax/ modified" if src.get("modified") else ""}, sources sha256'
           f' {src["sha256_12"]}), {env["cpu_count"]} CPU cores, {env["date"]},'
           f' {env["wall_s"]:.0f} s, load average {env["load_average_start"]:.1f} at the start and'
           f' {env["load_average_end"]:.1f} at the end.', '',
           'kfax: `optax.chain(kfax.kfac(table), optax.sgd(lr, momentum=0.9))` with kfac\'s'
           f' defaults, statistics (MC Fisher) every {args.stats_every} steps. Adam:'
           f' `optax.adam(lr)`. Every configuration on {args.seeds} seeds (median); the best of'
           ' each optimizer (*): fewest median steps, then seconds. Seconds count the jitted steps'
           ' only (compile and evaluation excluded); ms/step is the mean over the steps run,'
           ' statistics steps included.', '']
  for name, result in results.items():
    lines += table_lines(name, result, args) + ['']
  text = '\n'.join(lines)
  print('\n' + text)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, 'w') as f:
    record = {'environment': env, 'settings': vars(args), 'results': results}
    json.dump(time_to_accuracy.finite(record), f)
  Path(args.md).write_text(text)
  print(f'wrote {args.md} and {args.out} ({env["wall_s"]:.0f} s)')


if __name__ == '__main__':
  main()
