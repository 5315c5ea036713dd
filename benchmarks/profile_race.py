"""Where a kfax step's time goes on each race model (`race.py`), beside SGD's and Adam's.

For each task, with the best configuration of each contestant in the race (`--race_json`,
default `results/race.json`; `--defaults` for `kfax.kfac`'s defaults with statistics every 5
steps):

- **in situ**: the race's own compiled steps (`race.compile_steps`, state donated) of SGD, Adam,
  kfax and kfax_qm, run through `--cycles` periods of the race's schedule, each step timed alone
  (`block_until_ready`); the median of each kind of step (plain, with statistics, with a
  refresh) and the schedule's mean (the amortized step);
- **stages**, each jitted alone on the same model and batch (`profile_stages.stage_times`):
  forward+backward, the A/G statistics, the MC backward, the factor EMA, preconditioning and the
  refresh.

Writes `results/profile_race_after.{md,json}` (`--tag before` writes `profile_race_before.*`,
so two commits' profiles sit side by side). About 2 minutes on 2 CPU cores:

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_stages  # noqa: E402
import race  # noqa: E402

KINDS = ('plain', 'stats', 'refresh', 'stats+refresh')


def race_configs(name: str, path: Path, defaults: bool) -> dict[str, race.Config]:
  """The race's best config of each contestant on task `name` (from the race JSON at `path`);
  with `defaults`, kfax gets `kfax.kfac`'s defaults and statistics every 5 steps instead."""
  rows = json.loads(path.read_text())['results'][name]['race']
  configs = {r['contestant']: race.to_config(r) for r in rows}
  if defaults:
    configs['kfax'] = race.Config('kfax', configs['kfax'].lr, (
        ('damping', 1e-4), ('stats_every', 5), ('inverse_every', 10)))
  return configs


def step_times(arena: race.Arena, config: race.Config, cycles: int) -> dict[str, Any]:
  """Each step of `cycles` periods of the race schedule timed alone; medians per kind, mean."""
  run = arena.start(config, 0)
  i = config.option('inverse_every') or 1
  period = math.lcm(config.option('stats_every') or 1, i)
  times: dict[str, list[float]] = {k: [] for k in KINDS}
  every: list[float] = []
  for step in range(period * (cycles + 1)):  # within the task's step budget (its batches)
    begin = time.perf_counter()
    loss, stats = race.take_step(run, step)
    jax.block_until_ready((run.params, run.rest, run.opt_state, loss))
    seconds = time.perf_counter() - begin
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
  configs = race_configs(name, Path(args.race_json), args.defaults)
  timed = [c for c in ('sgd', 'adam', 'kfax', 'kfax_qm') if c in configs]
  out = {'configs': {c: configs[c].label() for c in timed},
         'steps': {c: step_times(arena, configs[c], args.cycles) for c in timed}}
  params, rest = task.init(0)
  batch = tuple(a[0] for a in task.batches(0, 1))
  out['stages'] = profile_stages.stage_times(
      task.loss, params, rest, batch, args.stage_steps,
      damping=configs['kfax'].option('damping'), inverse_every=100)
  return out


def markdown(results: dict[str, Any], command: str, tag: str) -> str:
  lines = [f'# kfax step profile on the race models ({tag})', '',
           f'`{command}`; jax {jax.__version__}, {os.cpu_count()} cores, '
           f'load average {os.getloadavg()[0]:.1f}. Milliseconds: the median of each kind of'
           ' step, and the mean over the schedule (the amortized step).', '',
           "## In situ: the race's compiled steps", '',
           '| task | contestant (race config) | plain | stats | refresh | stats+refresh | mean |'
           ' x SGD | x Adam |', '|---|---|---|---|---|---|---|---|---|']
  ms = lambda v: f'{v * 1e3:.2f}' if v is not None else '-'
  for name, r in results.items():
    st = r['steps']
    for c, label in r['configs'].items():
      t = st[c]
      lines.append(f'| {name} | {label} | ' + ' | '.join(ms(t.get(kind)) for kind in KINDS)
                   + f' | {ms(t["mean"])} | {t["mean"] / st["sgd"]["mean"]:.2f} |'
                   f' {t["mean"] / st["adam"]["mean"]:.2f} |')
  lines += ['', '## Stages of a kfax step, each jitted alone (`profile_stages.py`)', '',
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
  p.add_argument('--race_json', default=str(race.RESULTS / 'race.json'),
                 help='the race whose best configs are profiled')
  p.add_argument('--tag', default='after', help='writes results/profile_race_TAG.md and .json')
  args = p.parse_args(argv)
  results = {name: profile(name, args) for name in args.tasks.split(',')}
  command = ' '.join(['python benchmarks/profile_race.py'] + (sys.argv[1:] if argv is None
                                                               else argv))
  text = markdown(results, command, args.tag)
  print(text)
  stem = race.RESULTS / f'profile_race_{args.tag}'
  stem.with_suffix('.md').write_text(text + '\n')
  stem.with_suffix('.json').write_text(json.dumps({'command': command, 'results': results},
                                                  indent=1))


if __name__ == '__main__':
  main()
