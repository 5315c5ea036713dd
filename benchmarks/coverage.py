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

Timing. The learning rate lives in the optimizer state (`optax.inject_hyperparams`), so each
optimizer has one step function per task, compiled ahead of time (`jit(...).lower().compile()`,
not timed; a compiled executable cannot recompile, it would raise on a new input type) with the
train state donated. Runs are interleaved: every run of a task advances `--eval_every` steps in
turn, so a change of load on this shared machine hits all of them alike. A run's clock counts
only its chunks of steps, each ended by `jax.block_until_ready`; nothing inside a chunk waits on
the device. Evaluation (every `--eval_every` steps, outside the clock) reads the test accuracy
and the last step's loss; a run stops at the first evaluation at or above the target, at a
non-finite loss, or at the task's step budget. kfax's `skipped_stats` and `failed_refreshes`
counters are recorded at the end of every run.

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
import dataclasses
import datetime
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_accuracy  # noqa: E402  (its `finite` and the digits example it loads)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / 'results'

# ------------------------------------------------------------------------------------ models


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP, both residual."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.width, name='up')(h)
    return x + nn.Dense(self.width, name='down')(nn.gelu(h))


class TinyLM(nn.Module):
  """Causal transformer LM with learned positions and a tied output layer (`Embed.attend`)."""

  vocab: int
  length: int
  width: int = 32
  depth: int = 2
  heads: int = 2

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    embed = nn.Embed(self.vocab, self.width)
    pos = self.param('pos', nn.initializers.normal(0.02), (self.length, self.width))
    x = embed(tokens) + pos[:tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      x = Block(self.width, self.heads)(x, mask)
    return embed.attend(nn.LayerNorm()(x))


class ResBlock(nn.Module):
  """conv-BN-ReLU-conv-BN plus the input (a 1x1 conv+BN projection where the shape changes)."""

  channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    h = nn.Conv(self.channels, (3, 3), self.stride, use_bias=False)(x)
    h = nn.relu(norm()(h))
    h = norm()(nn.Conv(self.channels, (3, 3), use_bias=False)(h))
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = norm()(nn.Conv(self.channels, (1, 1), self.stride, use_bias=False)(x))
    return nn.relu(x + h)


class DigitsResNet(nn.Module):
  """Stem conv 16 + BN, blocks 16, 32 (stride 2), 32, global average pool, Dense."""

  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(16, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = ResBlock(16)(x, train)
    x = ResBlock(32, 2)(x, train)
    x = ResBlock(32)(x, train)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


# ------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
  """A model, its loss, its data and its evaluation, for one benchmark.

  `loss(params, rest, *batch) -> (mean loss, new rest)`: `rest` holds the other variable
  collections (BatchNorm's `batch_stats`; empty for the LM). `accuracy(params, rest, *test)`.
  """

  name: str
  description: str
  target: float
  max_steps: int
  batch_size: int
  init: Callable[[int], tuple[Any, Any]]  # seed -> (params, rest)
  loss: Callable[..., tuple[jax.Array, Any]]
  accuracy: Callable[..., jax.Array]
  batches: Callable[[int, int], tuple[np.ndarray, ...]]  # (seed, steps) -> arrays (steps, B, ...)
  test: tuple[np.ndarray, ...]


SORT_VOCAB, SORT_LENGTH = 16, 8  # tokens 0..15, separator 16


def sort_sequences(rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
  """(inputs, targets, mask), each (n, 2 * SORT_LENGTH): `x SEP sorted(x)` shifted by one; the
  mask is true where the target is one of the sorted tokens."""
  x = rng.integers(0, SORT_VOCAB, (n, SORT_LENGTH))
  seq = np.concatenate([x, np.full((n, 1), SORT_VOCAB), np.sort(x, axis=1)], axis=1)
  mask = np.zeros((n, 2 * SORT_LENGTH), bool)
  mask[:, SORT_LENGTH:] = True
  return seq[:, :-1].astype(np.int32), seq[:, 1:].astype(np.int32), mask


def lm_sort_task(batch_size: int = 32, max_steps: int = 500, target: float = 0.95) -> Task:
  model = TinyLM(vocab=SORT_VOCAB + 1, length=2 * SORT_LENGTH)
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

  return Task('lm-sort', 'tiny causal transformer LM, sort 8 tokens, masked loss', target,
              max_steps, batch_size, init, loss, accuracy, batches, test)


def batch_indices(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """(steps, batch_size) example indices: a fresh permutation per epoch, partial batch dropped."""
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  order = [rng.permutation(n)[:per_epoch * batch_size] for _ in range(-(-steps // per_epoch))]
  return np.concatenate(order).reshape(-1, batch_size)[:steps]


def digits_resnet_task(batch_size: int = 64, max_steps: int = 300, target: float = 0.97) -> Task:
  model = DigitsResNet()
  data = time_to_accuracy.digits.load_data()

  def init(seed):
    variables = model.init(jax.random.key(seed), data['x_test'][:1], False)
    return variables['params'], {'batch_stats': variables['batch_stats']}

  def loss(params, rest, x, y):
    logits, new = model.apply({'params': params, **rest}, x, True, mutable=['batch_stats'])
    return kfax.softmax_cross_entropy(logits, y), new

  def accuracy(params, rest, x, y):
    return jnp.mean(jnp.argmax(model.apply({'params': params, **rest}, x, False), -1) == y)

  def batches(seed, steps):
    plan = batch_indices(len(data['y_train']), steps, batch_size, seed)
    return data['x_train'][plan], data['y_train'][plan]

  return Task('digits-resnet', 'BatchNorm ResNet (7 convs) on digits 8x8', target, max_steps,
              batch_size, init, loss, accuracy, batches, (data['x_test'], data['y_test']))


TASKS = {'lm-sort': lm_sort_task, 'digits-resnet': digits_resnet_task}

# ------------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class Config:
  optimizer: str  # 'kfax' or 'adam'
  learning_rate: float

  def label(self) -> str:
    return f'{self.optimizer} lr {self.learning_rate:g}'


def transform(optimizer: str, learning_rate: float,
              table: kfax.LayerTable) -> optax.GradientTransformation:
  """The optimizer with its learning rate in the state (one compiled step for the whole grid)."""
  if optimizer == 'adam':
    return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
  return optax.chain(kfax.kfac(table),
                     optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate,
                                                         momentum=0.9))


def copy_tree(tree: Any) -> Any:
  """One fresh buffer per leaf, so that a donating step never sees a buffer twice."""
  return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass
class Steps:
  """AOT-compiled step functions of one optimizer on one task."""

  plain: Any  # (params, rest, opt_state, *batch) -> (params, rest, opt_state, loss)
  stats: Any  # kfax: (params, rest, opt_state, key, i, *batch) -> same; None for Adam
  accuracy: Any
  compile_s: float


def compile_steps(task: Task, optimizer: str, table: kfax.LayerTable) -> Steps:
  start = time.perf_counter()
  tx = transform(optimizer, 0.1, table)  # the rate is a state leaf; its value here is unused
  grad_fn = kfax.value_grad_and_stats(task.loss, has_aux=True)  # fisher='mc'
  extra = {} if optimizer == 'adam' else {'stats': None}

  def plain(params, rest, opt_state, *batch):
    (loss, rest), grads = jax.value_and_grad(task.loss, has_aux=True)(params, rest, *batch)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  def with_stats(params, rest, opt_state, key, i, *batch):
    (loss, rest), grads, stats = grad_fn(params, rest, *batch, rng=jax.random.fold_in(key, i))
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  params, rest = task.init(0)
  state = tx.init(params)
  batch = tuple(a[0] for a in task.batches(0, 1))
  donate = dict(donate_argnums=(0, 1, 2))
  compiled_plain = jax.jit(plain, **donate).lower(params, rest, state, *batch).compile()
  compiled_stats = None
  if optimizer == 'kfax':
    compiled_stats = jax.jit(with_stats, **donate).lower(
        params, rest, state, jax.random.key(0), np.int32(0), *batch).compile()
  accuracy = jax.jit(task.accuracy).lower(params, rest, *task.test).compile()
  return Steps(compiled_plain, compiled_stats, accuracy, time.perf_counter() - start)


# --------------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
  """One (configuration, seed) training run, advanced chunk by chunk."""

  config: Config
  seed: int
  steps: Steps
  data: tuple[np.ndarray, ...]
  params: Any
  rest: Any
  opt_state: Any
  key: jax.Array
  step: int = 0
  seconds: float = 0.0
  history: list = dataclasses.field(default_factory=list)  # (step, seconds, accuracy, loss)
  stop: str | None = None  # 'target', 'budget' or 'non-finite loss'


def start_run(task: Task, config: Config, seed: int, steps: Steps,
              table: kfax.LayerTable) -> Run:
  params, rest = task.init(seed)
  opt_state = transform(config.optimizer, config.learning_rate, table).init(params)
  return Run(config, seed, steps, task.batches(seed, task.max_steps), *copy_tree(
      (params, rest, opt_state)), key=jax.random.key(10_000 + seed))


def advance(run: Run, task: Task, n: int, stats_every: int) -> None:
  """`n` timed steps (clock stopped by one block_until_ready), then an untimed evaluation."""
  steps = run.steps
  n = min(n, task.max_steps - run.step)
  loss = None
  begin = time.perf_counter()
  for i in range(run.step, run.step + n):
    batch = tuple(a[i] for a in run.data)
    if steps.stats is not None and i % stats_every == 0:
      run.params, run.rest, run.opt_state, loss = steps.stats(
          run.params, run.rest, run.opt_state, run.key, np.int32(i), *batch)
    else:
      run.params, run.rest, run.opt_state, loss = steps.plain(
          run.params, run.rest, run.opt_state, *batch)
  jax.block_until_ready((run.params, run.rest, run.opt_state, loss))
  run.seconds += time.perf_counter() - begin
  run.step += n
  accuracy = float(steps.accuracy(run.params, run.rest, *task.test))
  loss = float(loss)
  run.history.append((run.step, run.seconds, accuracy, loss))
  if not math.isfinite(loss):
    run.stop = 'non-finite loss'
  elif accuracy >= task.target:
    run.stop = 'target'
  elif run.step >= task.max_steps:
    run.stop = 'budget'


def interleave(runs: list[Run], task: Task, args: argparse.Namespace) -> None:
  """Advances every unfinished run by `--eval_every` steps in turn until all have stopped."""
  while any(r.stop is None for r in runs):
    for r in runs:
      if r.stop is None:
        advance(r, task, args.eval_every, args.stats_every)


def kfac_counters(opt_state: Any) -> dict[str, int] | None:
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kfax.KfacState))
            if isinstance(s, kfax.KfacState)]
  if not states:
    return None
  return {'skipped_stats': int(states[0].skipped_stats),
          'failed_refreshes': int(states[0].failed_refreshes),
          'updates': int(states[0].count)}


def summarize(run: Run) -> dict[str, Any]:
  reached = run.stop == 'target'
  return {'seed': run.seed, 'stop': run.stop,
          'steps_to_target': run.step if reached else math.inf,
          'seconds_to_target': run.seconds if reached else math.inf,
          'steps_run': run.step, 'seconds_run': run.seconds,
          'ms_per_step': 1e3 * run.seconds / max(run.step, 1),
          'best_accuracy': max(h[2] for h in run.history),
          'kfax_counters': kfac_counters(run.opt_state), 'history': run.history}


def row(config: Config, runs: list[dict]) -> dict[str, Any]:
  median = lambda k: statistics.median(r[k] for r in runs)
  return {**dataclasses.asdict(config), 'label': config.label(), 'best': False,
          'seeds': [r['seed'] for r in runs], 'median_steps': median('steps_to_target'),
          'steps': [r['steps_to_target'] for r in runs],
          'seconds': [r['seconds_to_target'] for r in runs],
          'median_seconds': median('seconds_to_target'),
          'median_ms_per_step': median('ms_per_step'),
          'median_best_accuracy': median('best_accuracy'),
          'reached': sum(r['stop'] == 'target' for r in runs),
          'stops': [r['stop'] for r in runs], 'runs': runs}


def run_task(task: Task, args: argparse.Namespace) -> dict[str, Any]:
  params, rest = task.init(0)
  grad_fn = kfax.value_grad_and_stats(task.loss, has_aux=True)
  table = grad_fn.layers(params, rest, *(a[0] for a in task.batches(0, 1)))
  if args.summary:
    print(kfax.summary(table))
  floats = lambda s: [float(v) for v in s.split(',')]
  grid = ([Config('kfax', lr) for lr in floats(args.kfax_lrs)]
          + [Config('adam', lr) for lr in floats(args.adam_lrs)])
  compiled = {o: compile_steps(task, o, table) for o in ('kfax', 'adam')}
  print(f'  {task.name}: compiled in ' + ', '.join(f'{o} {s.compile_s:.1f} s'
                                                    for o, s in compiled.items()), flush=True)

  # Every configuration on every seed, interleaved.
  runs = [start_run(task, c, seed, compiled[c.optimizer], table)
          for seed in range(args.seeds) for c in grid]
  interleave(runs, task, args)
  by_config = {c: [summarize(r) for r in runs if r.config == c] for c in grid}
  rows = [row(c, by_config[c]) for c in grid]
  for r in rows:
    print(f'  {task.name} {r["label"]}: steps to target {r["steps"]}, seconds'
          f' {[round(x, 2) for x in r["seconds"]]}, stops {r["stops"]}', flush=True)
  for optimizer in ('kfax', 'adam'):  # fewest median steps, then seconds, then best accuracy
    best = min((r for r in rows if r['optimizer'] == optimizer),
               key=lambda r: (r['median_steps'], r['median_seconds'], -r['median_best_accuracy']))
    best['best'] = True
  return {'description': task.description, 'target': task.target, 'max_steps': task.max_steps,
          'batch_size': task.batch_size,
          'compile_s': {o: s.compile_s for o, s in compiled.items()},
          'summary': kfax.summary(table), 'configs': rows}


# ----------------------------------------------------------------------------------- output


def fmt(value: float, spec: str) -> str:
  return '-' if math.isinf(value) else format(value, spec)


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
        f' {r["median_best_accuracy"]:.4f} | {r["reached"]}/{len(r["seeds"])} |'
        f' {"*" if r["best"] else ""} |')
  k, a = (next(r for r in result['configs'] if r['best'] and r['optimizer'] == o)
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


def kfax_source() -> dict[str, Any]:
  """Which kfax ran: the commit, whether kfax/ differs from it, and a digest of its sources."""
  files = sorted((ROOT / 'kfax').glob('*.py'))
  out = {'sha256_12': hashlib.sha256(b''.join(f.read_bytes() for f in files)).hexdigest()[:12]}
  git = lambda *a: subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True).stdout
  try:
    out.update(commit=git('rev-parse', '--short', 'HEAD').strip(),
               modified=bool(git('status', '--porcelain', '--', 'kfax').strip()))
  except OSError:
    pass
  return out


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
         'load_average_start': os.getloadavg()[0], 'kfax_source': kfax_source()}
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
