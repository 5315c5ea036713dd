"""Where a kfax step's time goes on each race model (`race.py`), beside SGD's and Adam's.

For each task, with kfax's best configuration of the race (`results/race.json`; `--defaults`
for `kfax.kfac`'s defaults with statistics every 5 steps):

- **in situ**: the race's own compiled steps (`race.compile_steps`, state donated), run through
  `--cycles` periods of the race's schedule, each step timed alone (`block_until_ready`); the
  median of each kind of kfax step (plain, with statistics, with a refresh), the schedule's mean
  (the amortized step), and SGD's and Adam's steps the same way;
- **stages**, each jitted alone on the same model and batch (`profile_stages.stage_times`):
  forward+backward, the A/G statistics, the MC backward, the factor EMA, preconditioning and the
  refresh.

Writes `results/profile_race.{md,json}` (`--tag after` writes `profile_race_after.*`, so two
commits' profiles sit side by side). About 2 minutes on 2 CPU cores:

    python benchmarks/profile_race.py
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # as race.py

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_stages  # noqa: E402
import race  # noqa: E402

KINDS = ('plain', 'stats', 'refresh', 'stats+refresh')


def best_config(name: str, defaults: bool) -> race.Config:
  """kfax's race config on task `name`, or the defaults (lr from the race) with `defaults`."""
  rows = json.loads((race.RESULTS / 'race.json').read_text())['results'][name]['race']
  row = next(r for r in rows if r['contestant'] == 'kfax')
  config = race.to_config(row)
  if defaults:
    config = race.Config('kfax', config.lr,
                         (('damping', 1e-4), ('stats_every', 5), ('inverse_every', 10)))
  return config


def peer_config(name: str, contestant: str) -> race.Config:
  rows = json.loads((race.RESULTS / 'race.json').read_text())['results'][name]['race']
  return race.to_config(next(r for r in rows if r['contestant'] == contestant))


def step_times(arena: race.Arena, config: race.Config, cycles: int) -> dict[str, Any]:
  """Each step of `cycles` periods of the race schedule timed alone; medians per kind, mean."""
  run = arena.start(config, 0)
  s = config.option('stats_every') or 1
  i = config.option('inverse_every') or 1
  period = math.lcm(s, i)
  times: dict[str, list[float]] = {k: [] for k in KINDS}
  every: list[float] = []
  for step in range(period * (cycles + 1)):
    batch = tuple(a[step % arena.task.max_steps] for a in run.data)
    stats = run.steps.stats is not None and step % s == 0
    begin = time.perf_counter()
    if stats:
      out = run.steps.stats(run.params, run.rest, run.opt_state, run.key, np.int32(step), *batch)
    else:
      out = run.steps.plain(run.params, run.rest, run.opt_state, *batch)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - begin
    run.params, run.rest, run.opt_state, _ = out
    if step < period:  # the first period warms up
      continue
    every.append(seconds)
    refresh = run.steps.stats is not None and step % i == 0
    kind = ('stats+refresh' if refresh else 'stats') if stats else ('refresh' if refresh
                                                                    else 'plain')
    times[kind].append(seconds)
  return {'mean': statistics.fmean(every),
          **{k: statistics.median(v) for k, v in times.items() if v}}


def profile(name: str, args: argparse.Namespace) -> dict[str, Any]:
  task = race.TASKS[name]()
  arena = race.Arena(task, {})
  kfax_config = best_config(name, args.defaults)
  out = {'kfax_config': kfax_config.label(), 'steps': {}}
  for contestant in ('sgd', 'adam'):
    out['steps'][contestant] = step_times(arena, peer_config(name, contestant), args.cycles)
  out['steps']['kfax'] = step_times(arena, kfax_config, args.cycles)
  params, rest = task.init(0)
  batch = tuple(a[0] for a in task.batches(0, 1))
  out['stages'] = profile_stages.stage_times(
      task.loss, params, rest, batch, args.stage_steps,
      damping=kfax_config.option('damping'), inverse_every=100)
  return out


def markdown(results: dict[str, Any], command: str, tag: str) -> str:
  lines = [f'# kfax step profile on the race models ({tag})', '',
           f'`{command}`; jax {jax.__version__}, {os.cpu_count()} cores, '
           f'load average {os.getloadavg()[0]:.1f}. Milliseconds (median of each kind of step;'
           ' "amortized" is the mean over the schedule).', '',
           '## In situ: the race\'s compiled steps', '',
           '| task | kfax config | SGD | Adam | kfax plain | stats | refresh | stats+refresh |'
           ' kfax amortized | x SGD | x Adam |', '|---|---|---|---|---|---|---|---|---|---|---|']
  ms = lambda v: f'{v * 1e3:.2f}' if v is not None else '-'
  for name, r in results.items():
    st = r['steps']
    k, sgd, adam = st['kfax'], st['sgd']['mean'], st['adam']['mean']
    lines.append(f'| {name} | {r["kfax_config"]} | {ms(sgd)} | {ms(adam)} | '
                 + ' | '.join(ms(k.get(kind)) for kind in KINDS)
                 + f' | {ms(k["mean"])} | {k["mean"] / sgd:.2f} | {k["mean"] / adam:.2f} |')
  lines += ['', '## Stages, each jitted alone (`profile_stages.py`)', '',
            '| task | ' + ' | '.join(profile_stages.STAGES) + ' |',
            '|---|' + '---|' * len(profile_stages.STAGES)]
  for name, r in results.items():
    parts = profile_stages.split(r['stages'])
    lines.append(f'| {name} | ' + ' | '.join(ms(parts[s]) for s in profile_stages.STAGES) + ' |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tasks', default=','.join(race.TASKS))
  p.add_argument('--cycles', type=int, default=6, help='timed periods of the schedule')
  p.add_argument('--stage_steps', type=int, default=20)
  p.add_argument('--defaults', action='store_true', help="kfax.kfac's defaults, not the race's")
  p.add_argument('--tag', default='before', help="results/profile_race[_TAG].md ('before': none)")
  args = p.parse_args(argv)
  results = {name: profile(name, args) for name in args.tasks.split(',')}
  command = ' '.join(['python benchmarks/profile_race.py'] + (sys.argv[1:] if argv is None
                                                               else argv))
  text = markdown(results, command, args.tag)
  print(text)
  stem = race.RESULTS / ('profile_race' + ('' if args.tag == 'before' else f'_{args.tag}'))
  stem.with_suffix('.md').write_text(text + '\n')
  stem.with_suffix('.json').write_text(json.dumps({'command': command, 'results': results},
                                                  indent=1))


if __name__ == '__main__':
  main()
