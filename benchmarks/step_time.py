"""Time per training step of SGD, Adam, kfax and (optionally) kfac-jax, plus state memory.

For each model (an MLP, a small CNN, a CIFAR-shape ResNet-18, an ImageNet-shape ResNet-50 and,
with `--models transformer`, a causal transformer LM; see `models.py`) and each optimizer, the
jitted step is compiled ahead of time (not timed), run a few warm-up steps, then timed step by
step (`jax.block_until_ready` after each); the median is reported. SGD, Adam, kfax's parts and
kfac-jax's plain step are timed in rounds, one step of each per round, so that a change of load
on a shared machine hits them alike (kfac-jax's steps with curvature, seconds each on CPU, are
timed after them).
Batches are fixed random arrays, so data loading is not timed. Every method's step is
the full training step: loss, gradients, optimizer update, `optax.apply_updates`, BatchNorm
statistics, with the train state donated (as kfac-jax does; `--no_donate` turns it off).

kfax is timed in three parts, from the compiled step functions of one `kfax.kfac` chained with
`optax.sgd(momentum=0.9)`, on states whose update count does or does not trigger a refresh
(`KfacState.count % inverse_every`):

- plain: the step without statistics (`jax.value_and_grad`, `stats=None`), no refresh;
- stats: the step with statistics (`kfax.value_grad_and_stats(fisher="mc")`), no refresh;
- refresh: the plain step with a refresh minus the plain step.

so that for statistics every `s` steps and a refresh every `i` updates the amortized step is
`plain + (stats - plain) / s + refresh / i`. `--check_steps` also runs one real cycle of that
schedule and reports its mean step, to check the formula. kfac-jax (`kfac_jax.Optimizer`, MC
Fisher "fisher_gradients", fixed learning rate, momentum and damping, `curvature_ema=0.95`) is
timed in the same three parts: curvature every step with inverses every 2 steps (odd steps:
stats; even steps: stats + refresh), and curvature once (all later steps: plain). Both libraries
are reported at the periods of the flags and at kfac-jax's matching setting (statistics every
step, refresh every `--matched_inverse_every`). kfac-jax is skipped, with a message, when
`import kfac_jax` fails; kfac-jax 0.0.8 needs jax <= 0.9.1 (see README.md).

Also reported: optimizer state bytes (sum of the state leaves' nbytes) and the dtypes of kfax's
state, XLA's temporary buffer size of each compiled step, the peak device memory where the
backend reports it (`n/a` on CPU), and the analytic cost model (`cost_model.py`): the predicted
kfax/SGD ratio at equal FLOP rates (if it fails for a model, the reason is printed and stored).

`--dtype bfloat16` runs the models' compute in bfloat16 (parameters, gradients and kfax's
curvature stay float32). `--size gpu` takes the sizes of `models.GPU` (ResNet-50 at batch 128,
224x224, width 64; the lm1b-sized LM), for `gpu.sh`. `--compile_threads N` compiles the step
functions after the first (SGD's) in N threads at once, to save wall time on a GPU host.

Run (about 4 minutes on 2 CPU cores without kfac-jax, 20 with it: its conv statistics take
seconds per step on CPU, so its steps with curvature are few, `--kfac_jax_steps`; results in
benchmarks/results/step_time.json):

    python benchmarks/step_time.py
    python benchmarks/step_time.py --models resnet18 --batch 64 --width 32 --steps 30
    python benchmarks/step_time.py --models transformer --dtype bfloat16 --out /tmp/lm.json
    bash benchmarks/gpu.sh            # ResNet-50 and the LM at GPU sizes, float32 and bfloat16
    /tmp/bench-venv/bin/python benchmarks/step_time.py   # with kfac-jax, on jax 0.9.1
"""

from __future__ import annotations

import os

# One OpenBLAS thread: its threads oversubscribe the cores beside XLA's pool and make CPU
# Cholesky / eigh steps 10-50x slower under load (README.md); kfac-jax uses the same LAPACK.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import cost_model
import kfax
import models

try:
  import kfac_jax
except Exception as error:  # noqa: BLE001 - any import failure means "skip kfac-jax"
  kfac_jax = None
  KFAC_JAX_ERROR = f'{type(error).__name__}: {error}'
else:
  KFAC_JAX_ERROR = ''

RESULTS = Path(__file__).resolve().parent / 'results'
LEARNING_RATE = 1e-3  # small, so random-data steps stay finite; time does not depend on it
MOMENTUM = 0.9
TrainState = tuple[Any, Any, Any]  # (params, batch_stats, opt_state)


@dataclasses.dataclass
class Problem:
  """A model with its initial variables and one fixed random batch."""

  name: str
  config: models.ModelConfig
  model: nn.Module
  params: Any
  batch_stats: Any
  x: jax.Array
  y: jax.Array  # class labels (batch,), or the LM's next tokens (batch, seq_len)
  dtype: str = 'float32'  # the model's compute dtype


def make_problem(name: str, config: models.ModelConfig, seed: int = 0,
                 dtype: str = 'float32') -> Problem:
  model, example = models.build(name, config, dtype)
  params, batch_stats = models.init(model, example, seed)
  x, y = models.random_batch(name, config, jax.random.key(seed + 1))
  return Problem(name, config, model, params, batch_stats, x, y, dtype)


def copy_tree(tree: Any) -> Any:
  """A fresh copy, one buffer per leaf (steps donate their train state).

  `kfax.kfac().init` returns a state whose int32 counters share one buffer, which a donating
  jit rejects ("Attempt to donate the same buffer twice"), so every state is copied first.
  """
  return jax.tree.map(jnp.copy, tree)


# ----------------------------------------------------------------------------- step functions


def make_loss(problem: Problem) -> Callable:
  """loss(params, batch_stats, x, y) -> (mean loss, new batch_stats), via kfax's loss helper
  (the LM's float32 logits `(batch, seq_len, vocab)` against its next tokens: a mean over
  tokens)."""
  model = problem.model

  def loss_fn(params, batch_stats, x, y):
    variables = {'params': params, **({'batch_stats': batch_stats} if batch_stats else {})}
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return kfax.softmax_cross_entropy(logits, y), updates.get('batch_stats', batch_stats)

  return loss_fn


def plain_step_fn(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """The first-order step (also kfax's step without statistics)."""

  def step(state: TrainState, x, y, key):
    del key
    params, batch_stats, opt_state = state
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=None)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  return step


def stats_fn(loss_fn: Callable, **options: Any) -> Callable:
  """kfax's loss, gradients and statistics (MC Fisher; `options`: `subsample`,
  `subsample_positions`, `stats_dtype` of `kfax.value_grad_and_stats`)."""
  return kfax.value_grad_and_stats(loss_fn, has_aux=True, fisher='mc', **options)


def stats_options(args: argparse.Namespace) -> dict[str, Any]:
  """The statistics options of the command line."""
  return {'subsample': args.subsample, 'subsample_positions': args.subsample_positions,
          'stats_dtype': args.stats_dtype}


def stats_step_fn(loss_fn: Callable, tx: optax.GradientTransformation,
                  **options: Any) -> Callable:
  """kfax's step with statistics (MC Fisher)."""
  grad_fn = stats_fn(loss_fn, **options)

  def step(state: TrainState, x, y, key):
    params, batch_stats, opt_state = state
    (loss, batch_stats), grads, stats = grad_fn(params, batch_stats, x, y, rng=key)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  return step


def compile_step(step: Callable, state: TrainState, problem: Problem,
                 donate: bool) -> tuple[Callable, dict]:
  """AOT-compiled `step` (train state donated if `donate`), its compile seconds, FLOPs, temp bytes.

  """
  start = time.perf_counter()
  lowered = lower_step(step, state, problem, donate)
  return finish_compile(lowered, time.perf_counter() - start)


def lower_step(step: Callable, state: TrainState, problem: Problem, donate: bool) -> Any:
  return jax.jit(step, donate_argnums=0 if donate else ()).lower(
      state, problem.x, problem.y, jax.random.key(0))


def finish_compile(lowered: Any, lower_s: float) -> tuple[Callable, dict]:
  """`lowered.compile()` and its info (compile_s counts the lowering too)."""
  start = time.perf_counter()
  compiled = lowered.compile()
  info = {'compile_s': lower_s + time.perf_counter() - start, 'xla_flops': None,
          'temp_bytes': None}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    info['xla_flops'] = float(cost['flops']) if cost and cost.get('flops', -1) > 0 else None
  except Exception:  # noqa: BLE001 - backend without cost analysis
    pass
  try:
    info['temp_bytes'] = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - backend without memory analysis
    pass
  return compiled, info


class Compiler:
  """Compiles step functions ahead of time: each at once (`threads` <= 1), or the first at once
  and the others in a pool of `threads` (lowered here, compiled there; XLA releases the GIL).
  The first is SGD's step: on a GPU its autotuning runs alone, and XLA's in-process autotuning
  cache can serve the later steps' identical convolutions and matmuls. A pooled step is a `Pending`, which waits for its compile
  on first use; its info dict is filled then."""

  def __init__(self, threads: int, donate: bool):
    self.donate = donate
    self.pool = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else None
    self.first = True
    self.pending: list[Pending] = []

  def __call__(self, step: Callable, state: TrainState,
               problem: Problem) -> tuple[Callable, dict]:
    if self.pool is None or self.first:
      self.first = False
      return compile_step(step, state, problem, self.donate)
    start = time.perf_counter()
    lowered = lower_step(step, state, problem, self.donate)
    info: dict[str, Any] = {}
    future = self.pool.submit(finish_compile, lowered, time.perf_counter() - start)
    self.pending.append(Pending(future, info))
    return self.pending[-1], info

  def close(self) -> None:
    """Waits for every compile (and fills its info)."""
    for step in self.pending:
      step.resolve()
    if self.pool is not None:
      self.pool.shutdown()


class Pending:
  """A step being compiled in a thread: the first call waits for it (and fills `info`)."""

  def __init__(self, future: concurrent.futures.Future, info: dict):
    self.future, self.info, self.compiled = future, info, None

  def resolve(self) -> Callable:
    if self.compiled is None:
      self.compiled, info = self.future.result()
      self.info.update(info)
    return self.compiled

  def __call__(self, *args: Any) -> Any:
    return self.resolve()(*args)


# ------------------------------------------------------------------------------------- timing


class Series(NamedTuple):
  """One timed series: `state = run(state, i)`, after an untimed `before(state, i)` if given."""

  run: Callable[[Any, int], Any]
  state: Any
  before: Callable[[Any, int], Any] | None = None


def time_interleaved(series: dict[str, Series], steps: int,
                     warmup: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
  """Seconds of each step of every series, timed in rounds of one step per series, so that a
  change of load on a shared machine hits every method alike (ratios stay honest)."""
  states = {k: s.state for k, s in series.items()}
  times: dict[str, list[float]] = {k: [] for k in series}
  for i in range(warmup + steps):
    for key, (run, _, before) in series.items():
      state = states[key]
      if before is not None:
        state = jax.block_until_ready(before(state, i))
      start = time.perf_counter()
      states[key] = jax.block_until_ready(run(state, i))
      if i >= warmup:
        times[key].append(time.perf_counter() - start)
  return times, states


def median(times: list[float]) -> float:
  return statistics.median(times) if times else float('nan')


def state_bytes(tree: Any) -> int:
  return int(sum(getattr(leaf, 'nbytes', 0) for leaf in jax.tree.leaves(tree)))


def with_count(opt_state: Any, count: int) -> Any:
  """The chained kfax state with its `KfacState.count` set (decides whether a refresh is due)."""
  kfac_state = opt_state[0]
  assert isinstance(kfac_state, kfax.KfacState)
  return (kfac_state._replace(count=jnp.asarray(count, jnp.int32)), *opt_state[1:])


def set_count(count: int) -> Callable[[TrainState, int], TrainState]:
  return lambda state, i: (state[0], state[1], with_count(state[2], count))


def amortized(parts: dict[str, float], stats_every: int, inverse_every: int) -> float:
  """plain + (stats - plain) / stats_every + refresh / inverse_every."""
  return (parts['plain'] + (parts['stats'] - parts['plain']) / stats_every
          + parts['refresh'] / inverse_every)


# ------------------------------------------------------------------------------------ methods


def first_order_series(problem: Problem, tx: optax.GradientTransformation,
                       args: argparse.Namespace,
                       compiler: Compiler) -> tuple[dict[str, Any], Callable[[], dict]]:
  """The method's compile info and a function giving its one timed series, 'step'."""
  loss_fn = make_loss(problem)
  state = (copy_tree(problem.params), copy_tree(problem.batch_stats), copy_tree(tx.init(problem.params)))
  opt_bytes = state_bytes(state[2])
  step, info = compiler(plain_step_fn(loss_fn, tx), state, problem)
  key = jax.random.key(0)
  run = lambda s, i: step(s, problem.x, problem.y, key)[0]
  return ({'state_bytes': opt_bytes, 'compiled': {'step': info}},
          lambda: {'step': Series(run, state)})


def first_order_result(info: dict[str, Any], times: dict[str, list[float]]) -> dict[str, Any]:
  return {'step_s': median(times['step']), **info, 'times_s': times['step']}


def kfax_series(problem: Problem, mode: str, args: argparse.Namespace,
                compiler: Compiler) -> tuple[dict[str, Any], Callable[[], dict]]:
  """kfax's compile info and a function giving its three timed series: stats, plain and plain
  with a refresh (it runs the first statistics step, so it waits for the compiles)."""
  if args.inverse_every < 2:
    raise ValueError('--inverse_every must be >= 2 to time steps without a refresh')
  loss_fn = make_loss(problem)
  table = stats_fn(loss_fn).layers(problem.params, problem.batch_stats, problem.x, problem.y)
  tx = optax.chain(
      kfax.kfac(table, damping=args.damping, ema_decay=0.95, inverse_every=args.inverse_every,
                damping_mode=mode),
      optax.sgd(LEARNING_RATE, momentum=MOMENTUM))
  state = (copy_tree(problem.params), copy_tree(problem.batch_stats), copy_tree(tx.init(problem.params)))
  opt_bytes = state_bytes(state[2])
  dtypes = sorted({str(leaf.dtype) for leaf in jax.tree.leaves(state[2][0])
                   if jnp.issubdtype(leaf.dtype, jnp.floating)})
  stats_step, stats_info = compiler(stats_step_fn(loss_fn, tx, **stats_options(args)), state,
                                    problem)
  plain_step, plain_info = compiler(plain_step_fn(loss_fn, tx), state, problem)
  keys = jax.random.split(jax.random.key(1), args.warmup + max(args.steps, args.check_steps))
  run_stats = lambda s, i: stats_step(s, problem.x, problem.y, keys[i])[0]
  run_plain = lambda s, i: plain_step(s, problem.x, problem.y, keys[i])[0]
  info = {'state_bytes': opt_bytes, 'state_dtypes': dtypes, 'run_stats': run_stats,
          'run_plain': run_plain,
          'compiled': {'stats_step': stats_info, 'plain_step': plain_info}}

  def make_series(state: TrainState = state) -> dict[str, Series]:
    # The first statistics (count 0) absorb and refresh; later steps with count 1 never refresh.
    state = jax.block_until_ready(run_stats(state, 0))
    return {'stats': Series(run_stats, copy_tree(state), set_count(1)),
            'plain': Series(run_plain, copy_tree(state), set_count(1)),
            'plain_refresh': Series(run_plain, state, set_count(0))}

  return info, make_series


def kfax_result(info: dict[str, Any], times: dict[str, list[float]], states: dict[str, Any],
                args: argparse.Namespace) -> dict[str, Any]:
  """The parts (refresh = plain with a refresh - plain) and, optionally, one real cycle."""
  parts = {'plain': median(times['plain']), 'stats': median(times['stats'])}
  parts['refresh'] = median(times['plain_refresh']) - parts['plain']
  run_stats, run_plain = info.pop('run_stats'), info.pop('run_plain')
  result = {'parts_s': parts, **info, 'times_s': times}
  if args.check_steps:
    result['schedule_check'] = check_schedule(run_stats, run_plain, states['plain'], args)
  return result


def check_schedule(run_stats: Callable, run_plain: Callable, state: TrainState,
                   args: argparse.Namespace) -> dict[str, Any]:
  """Mean step over `--check_steps` real steps: stats when i % s == 0, refresh at count 0."""
  state = jax.block_until_ready(with_count_state(state, 0))
  run = lambda s, i: (run_stats if i % args.stats_every == 0 else run_plain)(s, i)
  start = time.perf_counter()
  for i in range(args.check_steps):
    state = run(state, i)
  jax.block_until_ready(state)
  return {'steps': args.check_steps, 'stats_every': args.stats_every,
          'inverse_every': args.inverse_every,
          'mean_step_s': (time.perf_counter() - start) / args.check_steps}


def with_count_state(state: TrainState, count: int) -> TrainState:
  return (state[0], state[1], with_count(state[2], count))


# ----------------------------------------------------------------------------------- kfac-jax


def kfac_jax_loss(problem: Problem) -> tuple[Callable, bool]:
  """kfac-jax's value_and_grad_func (loss registered inside) and whether it carries state."""
  model, has_state = problem.model, bool(problem.batch_stats)

  def logits_of(params, batch_stats, x):
    variables = {'params': params, **({'batch_stats': batch_stats} if has_state else {})}
    return model.apply(variables, x, train=True, mutable=['batch_stats'])

  def loss_with_state(params, batch_stats, batch):
    x, y = batch
    logits, updates = logits_of(params, batch_stats, x)
    logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)  # LM: tokens as examples
    kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, updates['batch_stats']

  def loss(params, batch):
    x, y = batch
    logits, _ = logits_of(params, None, x)
    logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  if has_state:
    return jax.value_and_grad(loss_with_state, has_aux=True), True
  return jax.value_and_grad(loss), False


def kfac_jax_optimizer(problem: Problem, exact: bool, curvature_every: int, inverse_every: int,
                       damping: float) -> tuple[Any, bool]:
  value_and_grad, has_state = kfac_jax_loss(problem)
  opt = kfac_jax.Optimizer(
      value_and_grad_func=value_and_grad,
      l2_reg=0.0,
      value_func_has_aux=False,
      value_func_has_state=has_state,
      use_adaptive_learning_rate=False,
      use_adaptive_momentum=False,
      use_adaptive_damping=False,
      learning_rate_schedule=optax.constant_schedule(LEARNING_RATE),
      momentum_schedule=optax.constant_schedule(MOMENTUM),
      damping_schedule=optax.constant_schedule(damping),
      curvature_ema=0.95,
      curvature_update_period=curvature_every,
      inverse_update_period=inverse_every,
      use_exact_inverses=exact,
      num_burnin_steps=0,
      multi_device=False,
      estimation_mode='fisher_gradients',
  )
  return opt, has_state


def run_kfac_jax(problem: Problem, exact: bool, curvature_every: int, inverse_every: int,
                 args: argparse.Namespace, steps: int) -> tuple[list[float], int, float]:
  """Per-step seconds of `steps` kfac-jax steps (step 0 included), state bytes, setup seconds."""
  opt, has_state = kfac_jax_optimizer(problem, exact, curvature_every, inverse_every,
                                      args.damping)
  batch = (problem.x, problem.y)
  start = time.perf_counter()
  state = opt.init(copy_tree(problem.params), jax.random.key(0), batch,
                   copy_tree(problem.batch_stats) if has_state else None)
  setup = time.perf_counter() - start
  opt_bytes = state_bytes(state)
  params = copy_tree(problem.params)
  func_state = copy_tree(problem.batch_stats) if has_state else None
  keys = jax.random.split(jax.random.key(1), steps)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    out = opt.step(params, state, keys[i], batch=batch, func_state=func_state,
                   global_step_int=i)
    if has_state:
      params, state, func_state, _ = out
    else:
      params, state, _ = out
    jax.block_until_ready((params, state, func_state))
    times.append(time.perf_counter() - start)
  return times, opt_bytes, setup


def kfac_jax_plain_series(problem: Problem, exact: bool, args: argparse.Namespace) -> Series:
  """kfac-jax's plain step, timed in the rounds with the others: an optimizer whose curvature
  and inverses update at step 0 only, after that step."""
  opt, has_state = kfac_jax_optimizer(problem, exact, 10**9, 10**9, args.damping)
  batch = (problem.x, problem.y)
  func_state = copy_tree(problem.batch_stats) if has_state else None
  state = opt.init(copy_tree(problem.params), jax.random.key(0), batch, func_state)

  def run(train_state, i):
    params, opt_state, func_state = train_state
    out = opt.step(params, opt_state, jax.random.key(i), batch=batch, func_state=func_state,
                   global_step_int=i)
    return (*out[:2], out[2] if has_state else None)

  return Series(run, jax.block_until_ready(run((copy_tree(problem.params), state, func_state), 0)))


def time_kfac_jax(problem: Problem, exact: bool, args: argparse.Namespace,
                  plain: list[float]) -> dict[str, Any]:
  """kfac-jax's plain / stats / refresh parts: the `plain` times from the rounds, and medians
  over `--kfac_jax_steps` steps with curvature (its conv statistics take seconds per step on
  CPU), timed after the rounds."""
  warmup, steps = args.kfac_jax_warmup, args.kfac_jax_steps
  n = 2 * (warmup + steps) + 2
  # Curvature every step, inverses every 2 steps: odd steps stats only, even ones + refresh.
  every, opt_bytes, setup = run_kfac_jax(problem, exact, 1, 2, args, n)
  odd, even = every[1::2][warmup:], every[2::2][warmup:]
  parts = {'plain': median(plain), 'stats': median(odd)}
  parts['refresh'] = median(even) - parts['stats']
  return {'parts_s': parts, 'state_bytes': opt_bytes, 'first_step_s': every[0],
          'init_s': setup, 'times_s': {'stats': odd, 'stats_refresh': even, 'plain': plain}}


# ------------------------------------------------------------------------------------- driver


def peak_memory() -> str | int:
  stats = jax.devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else 'n/a'


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
  config = cost_model.override(cost_model.base_config(name, args.size), args)
  problem = make_problem(name, config, dtype=args.dtype)
  result: dict[str, Any] = {'config': config.asdict(),
                            'params': int(sum(p.size for p in jax.tree.leaves(problem.params)))}
  log(f'{name}: {config}, {result["params"]:,} parameters, {args.dtype} compute')
  compiler = Compiler(args.compile_threads, args.donate)
  start = time.perf_counter()
  pending = {
      'sgd': first_order_series(problem, optax.sgd(LEARNING_RATE, momentum=MOMENTUM), args,
                                compiler),
      'adam': first_order_series(problem, optax.adam(LEARNING_RATE), args, compiler)}
  pending.update({f'kfax_{mode}': kfax_series(problem, mode, args, compiler)
                  for mode in args.kfax_modes})
  methods = {m: (info, make()) for m, (info, make) in pending.items()}
  compiler.close()
  log(f'  compiled and set up in {time.perf_counter() - start:.1f} s')
  series = {(m, k): s for m, (_, named) in methods.items() for k, s in named.items()}
  kfac_jax_modes = [] if kfac_jax is None or args.no_kfac_jax else args.kfac_jax_modes.split(',')
  for mode in kfac_jax_modes:
    try:
      series[(f'kfac_jax_{mode}', 'plain')] = kfac_jax_plain_series(problem, mode == 'eigen', args)
    except Exception as error:  # noqa: BLE001 - report and go on with the other methods
      result[f'kfac_jax_{mode}'] = {'error': f'{type(error).__name__}: {error}'[:2000]}
  times, states = time_interleaved(series, args.steps, args.warmup)
  for method, (info, named) in methods.items():
    own_times = {k: times[(method, k)] for k in named}
    if method.startswith('kfax_'):
      own_states = {k: states[(method, k)] for k in named}
      result[method] = kfax_result(info, own_times, own_states, args)
      log(f'  {method}: ' + fmt_parts(result[method]['parts_s']))
    else:
      result[method] = first_order_result(info, own_times)
      log(f'  {method} {result[method]["step_s"] * 1e3:.2f} ms')
  for mode in kfac_jax_modes:
    if f'kfac_jax_{mode}' in result:
      continue  # its plain step failed
    try:
      result[f'kfac_jax_{mode}'] = time_kfac_jax(problem, mode == 'eigen', args,
                                                 times[(f'kfac_jax_{mode}', 'plain')])
      log(f'  kfac-jax {mode}: ' + fmt_parts(result[f'kfac_jax_{mode}']['parts_s']))
    except Exception as error:  # noqa: BLE001 - report and go on with the other methods
      result[f'kfac_jax_{mode}'] = {'error': f'{type(error).__name__}: {error}'[:2000]}
  for mode in kfac_jax_modes:
    if 'error' in result[f'kfac_jax_{mode}']:
      log(f'  kfac-jax {mode} failed: {result[f"kfac_jax_{mode}"]["error"][:300]}')
  result['cost_model'] = cost_model_of(name, config, result, args)
  result['peak_device_bytes'] = peak_memory()
  result['load_average_1min'] = os.getloadavg()[0]  # other processes skew the times
  return result


def cost_model_of(name: str, config: models.ModelConfig, result: dict[str, Any],
                  args: argparse.Namespace) -> dict[str, Any]:
  """`cost_model.analyze`, with the forward+backward FLOPs of the compiled SGD step if
  `--cost_model_flops sgd_step`; on failure the reason, printed and stored."""
  fb = None
  if args.cost_model_flops == 'sgd_step':
    fb = result['sgd']['compiled']['step'].get('xla_flops')
  try:
    return cost_model.analyze(name, config, args.dtype, fb_flops=fb, fb_source='xla (SGD step)')
  except Exception as error:  # noqa: BLE001 - report it and go on without a prediction
    reason = f'{type(error).__name__}: {error}'[:2000]
    log(f'  cost model skipped for {name}: {reason[:300]}')
    return {'error': reason}


def fmt_parts(parts: dict[str, float]) -> str:
  return ', '.join(f'{k} {v * 1e3:.2f} ms' for k, v in parts.items())


def log(message: str) -> None:
  print(message, flush=True)


def ratio_rows(name: str, result: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
  """Table rows: every method's ms per step and its ratio to SGD's step in the same run."""
  sgd = result['sgd']['step_s']
  s, i, n = args.stats_every, args.inverse_every, args.matched_inverse_every
  rows = [[name, 'sgd', f'{sgd * 1e3:.2f}', '1.00', '', '', '', ''],
          [name, 'adam', f'{result["adam"]["step_s"] * 1e3:.2f}',
           f'{result["adam"]["step_s"] / sgd:.2f}', '', '', '', '']]
  for key in [k for k in result if k.startswith(('kfax_', 'kfac_jax_'))]:
    if 'error' in result[key]:
      rows.append([name, key, 'failed', '', '', '', '', ''])
      continue
    parts = result[key]['parts_s']
    ours = amortized(parts, s, i)
    matched = amortized(parts, 1, n)
    mode = key.rsplit('_', 1)[1]
    totals = result['cost_model'].get('totals')
    predicted = (f'{cost_model.predicted_ratio(totals[mode], s, i, args.subsample):.2f}'
                 if totals else 'n/a')
    check = result[key].get('schedule_check')
    rows.append([name, key.replace('kfac_jax', 'kfac-jax'), f'{ours * 1e3:.2f}',
                 f'{ours / sgd:.2f}', f'{matched / sgd:.2f}', predicted,
                 f'{check["mean_step_s"] / sgd:.2f}' if check else '',
                 ' / '.join(f'{parts[p] * 1e3:.1f}' for p in ('plain', 'stats', 'refresh'))])
  return rows


def print_table(rows: list[list[str]], args: argparse.Namespace) -> None:
  s, i, n = args.stats_every, args.inverse_every, args.matched_inverse_every
  header = ['model', 'method', f'ms/step (s={s},i={i})', 'x SGD', f'x SGD (s=1,i={n})',
            'predicted x SGD', 'x SGD measured cycle', 'plain/stats/refresh ms']
  widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
  line = lambda r: '| ' + ' | '.join(v.ljust(w) for v, w in zip(r, widths)) + ' |'
  print(line(header))
  print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  for r in rows:
    print(line(r))


def library_rows(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
  """kfac-jax / kfax amortized-step ratios at both period settings, per model and mode."""
  lines = []
  for name, result in results.items():
    for mode in args.damping_modes.split(','):
      ours, theirs = result.get(f'kfax_{mode}'), result.get(f'kfac_jax_{mode}')
      if not ours or not theirs or 'error' in theirs:
        continue
      at = lambda s, i: amortized(theirs['parts_s'], s, i) / amortized(ours['parts_s'], s, i)
      lines.append(f'| {name} | {mode} | {at(1, args.matched_inverse_every):.2f} |'
                   f' {at(args.stats_every, args.inverse_every):.2f} |')
  return lines


def memory_rows(results: dict[str, Any]) -> list[str]:
  lines = []
  for name, result in results.items():
    methods = [k for k in result if k in ('sgd', 'adam') or k.startswith(('kfax_', 'kfac_jax_'))]
    cells = []
    for key in methods:
      if 'state_bytes' not in result[key]:
        continue
      temp = [c.get('temp_bytes') for c in result[key].get('compiled', {}).values()]
      temp_s = f', XLA temp {max(temp) / 2**20:.1f}' if temp and None not in temp else ''
      cells.append(f'{key} {result[key]["state_bytes"] / 2**20:.2f}{temp_s}')
    lines.append(f'| {name} | {"; ".join(cells)} | {result["peak_device_bytes"]} |')
  return lines


def environment() -> dict[str, Any]:
  try:
    cpu = next(l.split(':', 1)[1].strip() for l in subprocess.run(
        ['lscpu'], capture_output=True, text=True, check=False).stdout.splitlines()
        if l.startswith('Model name'))
  except StopIteration:
    cpu = platform.processor()
  device = jax.devices()[0]
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
      'kfax': kfax.__version__,
      'kfac_jax': getattr(kfac_jax, '__version__', None) if kfac_jax else None,
      'kfac_jax_import_error': KFAC_JAX_ERROR or None,
      'platform': device.platform, 'device_kind': device.device_kind, 'cpu': cpu,
      'cpu_count': os.cpu_count(), 'python': platform.python_version(),
  }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='mlp,cnn,resnet18,resnet50',
                 help=f'comma-separated, from {",".join(models.DEFAULTS)}')
  p.add_argument('--size', default='cpu', choices=('cpu', 'gpu'),
                 help='models.DEFAULTS (cpu) or models.GPU (the sizes of gpu.sh)')
  p.add_argument('--dtype', default='float32', choices=models.DTYPES,
                 help='the models\' compute dtype (parameters and kfax state stay float32)')
  cost_model.add_size_flags(p)
  p.add_argument('--steps', type=int, default=20, help='timed steps per measurement')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps before each measurement')
  p.add_argument('--stats_every', type=int, default=10, help='kfax steps between statistics')
  p.add_argument('--inverse_every', type=int, default=100, help='kfax updates between refreshes')
  p.add_argument('--matched_inverse_every', type=int, default=5,
                 help='refresh period of the matched comparison (statistics every step)')
  p.add_argument('--damping', type=float, default=1e-3)
  p.add_argument('--subsample', type=int, default=1,
                 help="kfax statistics from every k-th example (value_grad_and_stats(subsample=))")
  p.add_argument('--subsample_positions', type=int, default=1,
                 help='kfax statistics from about 1/k of the positions'
                      ' (value_grad_and_stats(subsample_positions=))')
  p.add_argument('--stats_dtype', choices=('bfloat16',), default=None,
                 help='kfax statistics rows rounded to bfloat16, accumulated in float32'
                      ' (value_grad_and_stats(stats_dtype=))')
  p.add_argument('--damping_modes', default='eigen,factored',
                 help='kfax modes; kfac-jax runs use_exact_inverses for eigen')
  p.add_argument('--check_steps', type=int, default=100,
                 help='also time this many real scheduled kfax steps (0: skip)')
  p.add_argument('--no_donate', dest='donate', action='store_false',
                 help='do not donate the train state to the jitted steps (kfac-jax always does)')
  p.add_argument('--kfac_jax_steps', type=int, default=3,
                 help='timed kfac-jax steps with curvature, per part (plain steps: --steps)')
  p.add_argument('--kfac_jax_warmup', type=int, default=1)
  p.add_argument('--kfac_jax_modes', default='eigen,factored',
                 help='kfac-jax modes (eigen = use_exact_inverses=True)')
  p.add_argument('--no_kfac_jax', action='store_true', help='skip kfac-jax even if installed')
  p.add_argument('--compile_threads', type=int, default=1,
                 help='compile the steps after SGD\'s in this many threads (1: one by one)')
  p.add_argument('--cost_model_flops', default='value_and_grad',
                 choices=('value_and_grad', 'sgd_step'),
                 help='forward+backward FLOPs of the cost model: XLA\'s count of the loss\'s'
                      ' value_and_grad (compiled for it) or of the compiled SGD step (no compile)')
  p.add_argument('--out', default=str(RESULTS / 'step_time.json'), help='JSON output path')
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  env = environment()
  log(f'jax {env["jax"]} on {env["device_kind"]} ({env["cpu"]}, {env["cpu_count"]} cores),'
      f' {env["date"]}, load average {os.getloadavg()[0]:.2f}, {args.dtype} compute')
  if kfac_jax is None:
    log(f'kfac-jax skipped: import kfac_jax failed ({KFAC_JAX_ERROR})')
  args.kfax_modes = args.damping_modes.split(',')
  start = time.perf_counter()
  results = {name: bench_model(name, args) for name in args.models.split(',')}
  env['load_average_end'] = os.getloadavg()[0]
  env['wall_s'] = time.perf_counter() - start
  print(f'\nStep time (median of {args.steps}); kfax and kfac-jax amortized as plain +'
        f' (stats - plain)/s + refresh/i')
  print_table([r for name, res in results.items() for r in ratio_rows(name, res, args)], args)
  lines = library_rows(results, args)
  if lines:
    print(f'\n| model | mode | kfac-jax / kfax (s=1, i={args.matched_inverse_every}) |'
          f' kfac-jax / kfax (s={args.stats_every}, i={args.inverse_every}) |\n|---|---|---|---|')
    print('\n'.join(lines))
  print('\n| model | optimizer state MiB (and XLA temp MiB of the step) | peak device bytes |'
        '\n|---|---|---|')
  print('\n'.join(memory_rows(results)))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'environment': env, 'settings': vars(args), 'results': results}, f, indent=1,
              default=float)
  log(f'\nwrote {args.out} ({env["wall_s"]:.0f} s)')


if __name__ == '__main__':
  main()
