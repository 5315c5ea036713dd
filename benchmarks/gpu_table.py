"""The markdown table of a `gpu.sh` run: kfax's amortized step against SGD's, per model and dtype.

Reads the `gpu_step_time_<model>_<dtype>.json` files of `step_time.py` and the run log
`gpu_runs.txt` (one line per run: model, dtype, exit status, seconds) in one directory, and
writes `gpu.md` there (or `--md`):

    python benchmarks/gpu_table.py --dir benchmarks/results

Columns: the method's median step (kfax amortized at the run's s and i, by default statistics
every 10 steps and a refresh every 100), its ratio to the SGD step of the same run, the cost
model's predicted ratio, the measured 100-step cycle where it was run, kfax's parts, and the
dtypes of kfax's optimizer state (float32 curvature under a bfloat16 model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cost_model
from step_time import amortized

RUN_LOG = 'gpu_runs.txt'
NOT_RUN = 200  # gpu.sh's status of a run it skipped for want of time
HEADER = ['model', 'dtype', 'method', 'ms/step', 'x SGD', 'predicted x SGD', 'x SGD measured cycle',
          'plain / stats / refresh ms', 'kfax state dtype']


def read_runs(directory: Path) -> list[dict[str, Any]]:
  """The runs of `gpu_runs.txt`, in order: model, dtype, status (exit code) and seconds."""
  path = directory / RUN_LOG
  if not path.exists():
    return []
  runs = []
  for line in path.read_text().splitlines():
    if line.strip():
      model, dtype, status, seconds = line.split()[:4]
      runs.append({'model': model, 'dtype': dtype, 'status': int(status),
                   'seconds': float(seconds)})
  return runs


def result_path(directory: Path, model: str, dtype: str) -> Path:
  return directory / f'gpu_step_time_{model}_{dtype}.json'


def method_rows(model: str, dtype: str, data: dict[str, Any]) -> list[list[str]]:
  """One row per method of one step_time result (a single model)."""
  settings, result = data['settings'], data['results'][model]
  s, i = settings['stats_every'], settings['inverse_every']
  sgd = result['sgd']['step_s']
  rows = [[model, dtype, 'sgd', f'{sgd * 1e3:.2f}', '1.00', '', '', '', ''],
          [model, dtype, 'adam', f'{result["adam"]["step_s"] * 1e3:.2f}',
           f'{result["adam"]["step_s"] / sgd:.2f}', '', '', '', '']]
  totals = result.get('cost_model', {}).get('totals')
  for key in [k for k in result if k.startswith('kfax_')]:
    parts, mode = result[key]['parts_s'], key.split('_', 1)[1]
    ms = amortized(parts, s, i)
    predicted = f'{cost_model.predicted_ratio(totals[mode], s, i):.2f}' if totals else 'n/a'
    check = result[key].get('schedule_check')
    rows.append([model, dtype, f'{key} (s={s},i={i})', f'{ms * 1e3:.2f}', f'{ms / sgd:.2f}',
                 predicted, f'{check["mean_step_s"] / sgd:.2f}' if check else '',
                 ' / '.join(f'{parts[p] * 1e3:.1f}' for p in ('plain', 'stats', 'refresh')),
                 ', '.join(result[key].get('state_dtypes', []))])
  return rows


def missing_row(run: dict[str, Any]) -> list[str]:
  status = run['status']
  why = (f'timed out after {run["seconds"]:.0f} s' if status in (124, 137)
         else 'not run: the time budget was spent' if status == NOT_RUN
         else f'failed (exit {status}), see gpu_log.txt' if status else 'no result file')
  return [run['model'], run['dtype'], why, '', '', '', '', '', '']


def markdown(rows: list[list[str]]) -> list[str]:
  widths = [max(len(r[c]) for r in [HEADER, *rows]) for c in range(len(HEADER))]
  line = lambda r: '| ' + ' | '.join(v.ljust(w) for v, w in zip(r, widths)) + ' |'
  return [line(HEADER), '|' + '|'.join('-' * (w + 2) for w in widths) + '|', *map(line, rows)]


def run_notes(runs: list[dict[str, Any]], results: dict[tuple[str, str], dict]) -> list[str]:
  """One line per run: its size, parameters, settings, compile and wall seconds, peak memory."""
  lines = []
  for run in runs:
    data = results.get((run['model'], run['dtype']))
    if data is None:
      lines.append(f'- {run["model"]} {run["dtype"]}: {missing_row(run)[2]}, no result')
      continue
    st, res = data['settings'], data['results'][run['model']]
    compile_s = max(c.get('compile_s', 0.0) for k, v in res.items()
                    if isinstance(v, dict) for c in v.get('compiled', {}).values())
    peak = res.get('peak_device_bytes')
    peak = f'{peak / 2**30:.1f} GiB' if isinstance(peak, int) else str(peak)
    lines.append(
        f'- {run["model"]} {run["dtype"]}:'
        f' {", ".join(f"{k} {v}" for k, v in res["config"].items())}, {res["params"]:,} parameters;'
        f' median of {st["steps"]} steps after {st["warmup"]} warm-up, measured cycle'
        f' {st["check_steps"] or "not run"}; longest compile {compile_s:.0f} s'
        f' ({st.get("compile_threads", 1)} threads); {run["seconds"]:.0f} s in all;'
        f' peak device memory {peak}; cost model FLOPs from'
        f' {res.get("cost_model", {}).get("forward_backward_source", "n/a")}')
  return lines


def write_table(directory: Path, md: Path | None = None, commit: str = 'unknown') -> str:
  """Writes (and returns) the markdown of the gpu.sh results in `directory`."""
  runs = read_runs(directory)
  if not runs:  # no log: every result file present
    runs = [{'model': p.stem.split('_')[3], 'dtype': p.stem.split('_')[4], 'status': 0,
             'seconds': float('nan')} for p in sorted(directory.glob('gpu_step_time_*.json'))]
  results, rows = {}, []
  for run in runs:
    path = result_path(directory, run['model'], run['dtype'])
    if run['status'] == 0 and path.exists():
      results[(run['model'], run['dtype'])] = json.loads(path.read_text())
      rows += method_rows(run['model'], run['dtype'], results[(run['model'], run['dtype'])])
    else:
      rows.append(missing_row(run))
  env = next(iter(results.values()))['environment'] if results else {}
  lines = [
      '# kfax vs SGD and Adam, step time on one GPU (`bash benchmarks/gpu.sh`)', '',
      f'Device: {env.get("device_kind", "unknown")} ({env.get("platform", "?")}); jax'
      f' {env.get("jax", "?")}, flax {env.get("flax", "?")}, optax {env.get("optax", "?")},'
      f' kfax {env.get("kfax", "?")} (commit {commit}); Python {env.get("python", "?")};'
      f' {env.get("date", "?")}.', '',
      'ms/step: median step; for kfax the amortized step plain + (stats - plain)/s +'
      ' refresh/i of its parts. x SGD: over the SGD step of the same run. predicted:'
      ' `cost_model.py` at equal FLOP rates. Each model and dtype is one `step_time.py` process.',
      '', *markdown(rows), '', 'Runs:', '', *run_notes(runs, results), '']
  text = '\n'.join(lines)
  (md or directory / 'gpu.md').write_text(text)
  return text


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--dir', default=str(Path(__file__).resolve().parent / 'results'),
                 help='where the gpu_step_time_*.json files and gpu_runs.txt are')
  p.add_argument('--md', help='output markdown (default: DIR/gpu.md)')
  p.add_argument('--commit', default='unknown', help='the git commit that was run')
  args = p.parse_args(argv)
  print(write_table(Path(args.dir), Path(args.md) if args.md else None, args.commit))


if __name__ == '__main__':
  main()
