"""Trial of kfax's statistics options on race tasks (positions, bfloat16, empirical Fisher).

Each task runs Adam and kfax at the race's best configurations (`results/race.json`), kfax as
it is and with each of `--variants` (`value_grad_and_stats` options; `positions k`: statistics
from the lattice of positions whose coordinates sum to a multiple of k; `stats_dtype bfloat16`:
statistics rows rounded to bfloat16, accumulated in float32; `fisher empirical`: G from the
loss's own gradients, no MC backward), on `--seeds` seeds, interleaved as in `race.py`. Writes
`results/NAME.json` and `.md` (`--name`):

  python benchmarks/stats_trial.py --tasks resnet,cnn,lm --seeds 10   # positions 2 and 4
  python benchmarks/stats_trial.py --tasks resnet,cnn,lm --seeds 10 \
      --variants "stats_dtype bfloat16;positions 2" --name stats_dtype_trial
  python benchmarks/stats_trial.py --tasks mlp,cnn,autoencoder,lm,resnet --seeds 10 \
      --variants "fisher empirical" --name fisher_trial
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')
sys.path.insert(0, str(Path(__file__).resolve().parent))

import race  # noqa: E402


def variant(text: str) -> tuple[str, object]:
  """'positions 2' -> ('positions', 2); 'stats_dtype bfloat16' -> ('stats_dtype', 'bfloat16')."""
  key, value = text.split()
  return key, int(value) if value.isdigit() else value


def missed_as_inf(values: list) -> list[float]:
  """A run that missed the target has no steps or seconds: infinite for the medians."""
  return [math.inf if v is None else v for v in values]


def best(results: dict, task: str, contestant: str) -> race.Config:
  """`contestant`'s best configuration in the race of `results`, without statistics options."""
  r = next(r for r in results[task]['race'] if r['contestant'] == contestant)
  options = tuple((k, v) for k, v in r['options'].items()
                  if k not in dict(race.KFAX_STATS_OPTIONS))
  return race.Config(contestant, r['lr'], options)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tasks', default='resnet,cnn,lm')
  parser.add_argument('--seeds', type=int, default=10)
  parser.add_argument('--variants', default='positions 2;positions 4',
                      help="';'-separated kfax options, each 'name value'")
  parser.add_argument('--race_json', default=str(race.RESULTS / 'race.json'))
  parser.add_argument('--name', default='positions_trial',
                      help='results/NAME.json and .md')
  args = parser.parse_args()
  variants = [variant(v) for v in args.variants.split(';')]
  results = json.loads(Path(args.race_json).read_text())['results']
  out, lines = {}, [
      f'# Trial of kfax statistics options: {args.variants}', '',
      f'`python benchmarks/stats_trial.py --tasks {args.tasks} --seeds {args.seeds} --variants'
      f' "{args.variants}" --name {args.name}`; '
      f'{race.cpu_model()}, jax {race.jax.__version__}, {time.strftime("%Y-%m-%d")}. Medians over '
      'seeds; seconds count the jitted steps only, runs interleaved.', '',
      '| task | configuration | median steps | median seconds | ms/step | steps per seed |',
      '|---|---|---|---|---|---|']
  for name in args.tasks.split(','):
    arena = race.Arena(race.TASKS[name](), {})
    kfax_best, adam_best = best(results, name, 'kfax'), best(results, name, 'adam')
    configs = [adam_best, kfax_best] + [
        race.Config('kfax', kfax_best.lr, kfax_best.options + (v,)) for v in variants]
    rows = race.run_configs(arena, configs, list(range(args.seeds)), 10, 5.0)
    out[name] = rows
    for r in rows:
      steps, seconds = missed_as_inf(r['steps']), missed_as_inf(r['seconds'])
      arrived = [s / n * 1e3 for s, n in zip(seconds, steps) if math.isfinite(n)]
      per_step = f'{statistics.median(arrived):.2f}' if arrived else '-'
      lines.append(f'| {name} | {r["label"]} | {statistics.median(steps):g} | '
                   f'{statistics.median(seconds):.3f} | {per_step} | '
                   f'{", ".join(f"{s:g}" for s in steps)} |')
  (race.RESULTS / f'{args.name}.json').write_text(json.dumps(out, indent=1, default=float))
  (race.RESULTS / f'{args.name}.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
