"""Watching a run: a progress bar, metrics to CSV and TensorBoard, PNG plots, and checkpoints.

`Monitor` shows a tqdm bar (images/s, loss, ETA) and writes each logged metric as a row
`step,metric,value,seconds` of `<log_dir>/metrics.csv` and as a TensorBoard scalar
(tensorboardX); `plot` draws every metric of that CSV against steps into `<log_dir>/<metric>.png`.
`Checkpoints` saves and restores a train state with orbax (`CheckpointManager`), so that a run
restarted with `--resume` continues exactly where the last checkpoint left it. Only process 0
shows and writes metrics; every process takes part in checkpointing, as orbax requires.
"""

from __future__ import annotations

import csv
import os
import time
from typing import Any

import jax

METRICS = 'metrics.csv'


class Monitor:
  """Progress and metrics of one run, from `start` to `total` steps of `images` images each."""

  def __init__(self, log_dir: str | None, total: int, images: int, start: int = 0,
               show: bool = True):
    from tqdm.auto import tqdm

    self.lead = jax.process_index() == 0
    self.images, self.clock, self.shown = images, time.perf_counter(), {}
    self.bar = tqdm(total=total * images, initial=start * images, unit='img', unit_scale=True,
                    disable=not (show and self.lead), dynamic_ncols=True, smoothing=0.1)
    self.csv = self.writer = None
    if log_dir and self.lead:
      from tensorboardX import SummaryWriter

      os.makedirs(log_dir, exist_ok=True)
      path = os.path.join(log_dir, METRICS)
      fresh = not os.path.exists(path) or start == 0
      self.csv = open(path, 'w' if fresh else 'a', newline='')
      if fresh:
        csv.writer(self.csv).writerow(('step', 'metric', 'value', 'seconds'))
      self.writer = SummaryWriter(log_dir, purge_step=start or None)
      self.log_dir = log_dir

  def advance(self, steps: int = 1) -> None:
    self.bar.update(steps * self.images)

  def log(self, step: int, **metrics: float) -> None:
    """Values at `step`: on the bar, in the CSV and in TensorBoard."""
    if not self.lead:
      return
    self.shown.update({k: f'{v:.4g}' for k, v in metrics.items()})
    self.bar.set_postfix(self.shown, refresh=False)
    seconds = time.perf_counter() - self.clock
    for name, value in metrics.items():
      if self.csv is not None:
        csv.writer(self.csv).writerow((step, name, float(value), f'{seconds:.3f}'))
        self.writer.add_scalar(name, float(value), step)
    if self.csv is not None:
      self.csv.flush()

  def close(self) -> None:
    self.bar.close()
    if self.csv is not None:
      self.csv.close()
      self.writer.close()
      plot(self.log_dir)


def read_metrics(log_dir: str) -> dict[str, list[tuple[int, float]]]:
  """`{metric: [(step, value), ...]}` from a run's CSV, in order; a resumed run's later rows
  replace those of the steps it repeats."""
  out: dict[str, dict[int, float]] = {}
  with open(os.path.join(log_dir, METRICS), newline='') as f:
    for row in csv.DictReader(f):
      out.setdefault(row['metric'], {})[int(row['step'])] = float(row['value'])
  return {name: sorted(values.items()) for name, values in out.items()}


def plot(log_dir: str) -> list[str]:
  """One PNG per metric of the run's CSV, against steps; returns their paths."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  paths = []
  for name, points in read_metrics(log_dir).items():
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    steps, values = zip(*points)
    ax.plot(steps, values, marker='.' if len(points) < 50 else None)
    ax.set_xlabel('step')
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(log_dir, f'{name.replace("/", "_")}.png'))
    fig.savefig(paths[-1])
    plt.close(fig)
  return paths


def check_checkpoint_flags(args: Any) -> None:
  """SystemExit for checkpoint flags out of range: `--resume` without `--checkpoint_dir`,
  `--checkpoint_every` or `--stop_at` below 1."""
  if args.resume and not args.checkpoint_dir:
    raise SystemExit('--resume needs --checkpoint_dir (the checkpoints to resume from).')
  if args.checkpoint_every < 1:
    raise SystemExit(f'--checkpoint_every {args.checkpoint_every} must be >= 1.')
  if args.stop_at is not None and args.stop_at < 1:
    raise SystemExit(f'--stop_at {args.stop_at} must be >= 1.')


class Checkpoints:
  """Orbax checkpoints of a train state in `directory`, every `every` steps, the last `keep`
  kept. PRNG keys are saved as their raw data and rewrapped on restore."""

  def __init__(self, directory: str, every: int, keep: int = 2):
    import orbax.checkpoint as ocp

    self.ocp = ocp
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, force: bool = False) -> None:
    self.manager.save(step, args=self.ocp.args.StandardSave(_raw_keys(state)), force=force)

  def restore(self, like: Any) -> tuple[int, Any]:
    """The latest step and its state, laid out (shapes, dtypes, shardings) like `like`."""
    step = self.manager.latest_step()
    abstract = jax.tree.map(self.ocp.utils.to_shape_dtype_struct, _raw_keys(like))
    raw = self.manager.restore(step, args=self.ocp.args.StandardRestore(abstract))
    return step, _wrapped_keys(raw, like)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _raw_keys(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _wrapped_keys(raw: Any, like: Any) -> Any:
  return jax.tree.map(
      lambda r, x: jax.random.wrap_key_data(r, impl=jax.random.key_impl(x)) if _is_key(x) else r,
      raw, like)
