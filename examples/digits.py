"""K-FAC vs SGD with momentum vs Adam on scikit-learn's digits (8x8 images, 10 classes).

Trains a small MLP and a small CNN with each optimizer and prints, for each, the steps and the
wall-clock seconds it takes to reach a target test accuracy, and the final test accuracy. Every
step function is jit-compiled, and compiled before the clock starts; the clock counts training
steps only (evaluation, every `--eval_every` steps, is not timed).

K-FAC computes its curvature statistics every `--stats_every` steps: those steps run a jitted
function that calls `kfax.value_grad_and_stats` and passes `stats=` to the optimizer; the others
run a jitted plain `jax.value_and_grad` step with `stats=None`. Each compiles once. The optimizer
is built around the loss's layer table (`kfax.value_grad_and_stats(loss_fn).layers(params, x, y)`,
one shape-only trace on the first batch's shapes).

`--api nnx` trains the same two models written in Flax NNX (`nnx.Linear`, `nnx.Conv`; the same
sizes and initializers) with the same loop, steps and hyperparameters: the loss takes the
`nnx.Module` itself, `loss_fn(model, x, y)`, the table comes from
`kfax.value_grad_and_stats(loss_fn).layers(model, x, y)`, and each step calls
`nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, stats=stats)` inside a `jax.jit`
over the state of `nnx.split((model, optimizer))` as a pure dict (`make_nnx_steps` says why not
`nnx.jit`).

Run (CPU is fine, well under two minutes):

    python examples/digits.py
    python examples/digits.py --api nnx
    python examples/digits.py --models mlp --damping_mode eigen --damping 1e-3 --json out.json
    python examples/digits.py --checkpoint_dir /tmp/digits --stop_at 200  # as if interrupted
    python examples/digits.py --checkpoint_dir /tmp/digits --resume

Needs scikit-learn (`pip install -e .[examples]`); the data set ships with it, no download.
A progress bar per run (`--no-progress` hides it) and, with `--log_dir DIR`, per run
`DIR/<model>-<optimizer>/metrics.csv`, TensorBoard events and PNG plots of the loss and test
accuracy at each evaluation (`examples/_monitor.py`: tqdm, tensorboardX, matplotlib).

Checkpoints (`examples/_monitor.py`'s `Checkpoints`, orbax): with `--checkpoint_dir DIR` each run
saves its train state and its evaluations so far in `DIR/<model>-<optimizer>/` every
`--checkpoint_every` steps, at its end and at `--stop_at` (both multiples of `--eval_every`, so
that a checkpoint ends an evaluation chunk); `--resume` continues each run from its latest
checkpoint (a finished run is not retrained). The batches and K-FAC's sampling keys are functions
of the seed and the step, so an interrupted and resumed run ends with exactly the parameters,
test accuracies and steps to the target of an uninterrupted one; saving is not timed.

On CPU, JAX runs Cholesky and eigendecompositions through SciPy's OpenBLAS, whose threads
oversubscribe the cores beside XLA's own thread pool: on a busy 2-core machine a refresh then
took 2 s instead of 45 ms. This script therefore defaults `OPENBLAS_NUM_THREADS` to 1.
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import kfax

Data = dict[str, np.ndarray]
Steps = tuple[jax.stages.Wrapped, jax.stages.Wrapped, jax.stages.Wrapped]

# Defaults measured on this problem (MLP and CNN, 5 seeds; steps to 97% test accuracy): with a
# norm constraint (KL clipping) the lightly damped, "factored" K-FAC converges at every learning
# rate tried (0.03-0.3) and needs ~52 (MLP) / ~40 (CNN) steps, against ~102 / ~72 for Adam at its
# best learning rate. Without the constraint, K-FAC needs damping >= 0.3 (or a learning rate
# <= 0.03) not to diverge, and is then only about as fast as Adam.
KFAC_DEFAULTS = dict(
    learning_rate=0.1,
    damping=1e-4,
    damping_mode='factored',
    norm_constraint=1e-3,
    ema_decay=0.95,
    inverse_every=10,
    stats_every=5,
    fisher='mc',
)
BATCH_SIZE = 128
OPTIMIZERS = ('kfac', 'sgd', 'adam')  # each model's runs, in order
CHECKPOINT_EVERY = 100
SGD_LEARNING_RATE = 0.3  # best of {0.03, 0.1, 0.3}
ADAM_LEARNING_RATE = 1e-2  # best of {1e-3, 3e-3, 1e-2, 3e-2}


def load_data(split_seed: int = 0, test_size: int = 360) -> Data:
  """Digits as (N, 8, 8, 1) float32 images in [0, 1] and int32 labels, split stratified."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
      images, labels, test_size=test_size, stratify=labels, random_state=split_seed)
  return {'x_train': x_train, 'y_train': y_train, 'x_test': x_test, 'y_test': y_test}


class MLP(nn.Module):
  """64 -> 128 -> 128 -> 10, ReLU."""

  hidden: int = 128
  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.classes)(x)


class CNN(nn.Module):
  """Conv 3x3 16 -> ReLU -> Conv 3x3 32 stride 2 -> ReLU -> Dense 10."""

  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    return nn.Dense(self.classes)(x.reshape((x.shape[0], -1)))


MODELS: dict[str, type[nn.Module]] = {'mlp': MLP, 'cnn': CNN}


# The same models in Flax NNX (`--api nnx`). nnx.Linear and nnx.Conv have linen's default
# initializers (LeCun normal kernels, zero biases), so only the random draws differ.
class NnxMLP(nnx.Module):
  """64 -> 128 -> 128 -> 10, ReLU."""

  def __init__(self, *, rngs: nnx.Rngs, hidden: int = 128, classes: int = 10):
    self.dense1 = nnx.Linear(64, hidden, rngs=rngs)
    self.dense2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.dense3 = nnx.Linear(hidden, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.dense1(x))
    x = nnx.relu(self.dense2(x))
    return self.dense3(x)


class NnxCNN(nnx.Module):
  """Conv 3x3 16 -> ReLU -> Conv 3x3 32 stride 2 -> ReLU -> Dense 10 (on 8x8x1 images)."""

  def __init__(self, *, rngs: nnx.Rngs, classes: int = 10):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
    self.dense = nnx.Linear(4 * 4 * 32, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    return self.dense(x.reshape((x.shape[0], -1)))


# Classes, not instances: an NNX model holds its parameters, so `train` builds one per seed.
NNX_MODELS: dict[str, type[nnx.Module]] = {'mlp': NnxMLP, 'cnn': NnxCNN}

# What `train` and `layer_table` take: a linen module, or an NNX model class (`cls(rngs=...)`).
Model = nn.Module | Callable[..., nnx.Module]


def make_loss(model: nn.Module) -> Callable[[optax.Params, jax.Array, jax.Array], jax.Array]:
  """The mean cross-entropy of `model` on a batch, through kfax's loss (for the MC Fisher)."""

  def loss_fn(params: optax.Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return kfax.softmax_cross_entropy(model.apply({'params': params}, x), y)

  return loss_fn


def nnx_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """`make_loss` for NNX: the loss takes the model itself, so that kfax sees its layers."""
  return kfax.softmax_cross_entropy(model(x), y)


def layer_table(model: Model, x: jax.Array, y: jax.Array) -> kfax.LayerTable:
  """K-FAC's layer table of `model`'s loss on batches shaped like `(x, y)` (shapes only)."""
  if isinstance(model, nn.Module):
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))['params']
    return kfax.value_grad_and_stats(make_loss(model)).layers(params, x, y)
  abstract = nnx.eval_shape(lambda: model(rngs=nnx.Rngs(0)))
  return kfax.value_grad_and_stats(nnx_loss).layers(abstract, x, y)


def kfac_optimizer(
    table: kfax.LayerTable,
    learning_rate: float = KFAC_DEFAULTS['learning_rate'],
    *,
    damping: float = KFAC_DEFAULTS['damping'],
    damping_mode: str = KFAC_DEFAULTS['damping_mode'],
    norm_constraint: float | None = KFAC_DEFAULTS['norm_constraint'],
    ema_decay: float = KFAC_DEFAULTS['ema_decay'],
    inverse_every: int = KFAC_DEFAULTS['inverse_every'],
) -> optax.GradientTransformationExtraArgs:
  """K-FAC preconditioning (of the layers in `table`, see `layer_table`) followed by SGD with
  momentum 0.9."""
  return optax.chain(
      kfax.kfac(table, damping=damping, ema_decay=ema_decay, inverse_every=inverse_every,
                damping_mode=damping_mode, norm_constraint=norm_constraint),
      optax.sgd(learning_rate, momentum=0.9),
  )


def make_steps(model: nn.Module, tx: optax.GradientTransformation, fisher: str,
               subsample: int = 1) -> Steps:
  """Jitted (step with K-FAC statistics, plain step, test accuracy) for `model` and `tx`."""

  loss_fn = make_loss(model)
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher=fisher, subsample=subsample)

  @jax.jit
  def stats_step(params, opt_state, x, y, key):
    loss, grads, stats = grad_fn(params, x, y, rng=key)
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def plain_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, stats=None)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(model.apply({'params': params}, x), axis=-1) == y)

  return stats_step, plain_step, accuracy


def make_nnx_steps(graphdef: nnx.GraphDef, fisher: str, subsample: int = 1) -> Steps:
  """`make_steps` for NNX, over `state`, the pure state (`nnx.to_pure_dict`) of
  `nnx.split((model, optimizer))` (an `nnx.Optimizer`, graph `graphdef`): each step merges them,
  calls `optimizer.update(model, grads, stats=...)` and returns the new pure state.

  Why `jax.jit` over pure split state: `nnx.jit` of `(model, optimizer)` walks both graphs in
  Python on every call, to find their Variables and write the new values back; over the
  `nnx.State` itself, `jax.jit` still flattens and rebuilds its Variable nodes in Python. Its
  pure dict dispatches like linen's params. benchmarks/results/nnx_vs_linen.md, MLP, K-FAC, CPU:
  plain step 0.96x linen's here, 1.14x over the `nnx.State`, 1.42x through
  `nnx.cached_partial`, 2.4x under `nnx.jit` (the CNN's longer steps hide more of it: 1.37x).
  """
  grad_fn = kfax.value_grad_and_stats(nnx_loss, fisher=fisher, subsample=subsample)

  @jax.jit
  def stats_step(state, x, y, key):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads, stats = grad_fn(model, x, y, rng=key)
    optimizer.update(model, grads, stats=stats)
    return nnx.to_pure_dict(nnx.state((model, optimizer))), loss

  @jax.jit
  def plain_step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(nnx_loss)(model, x, y)
    optimizer.update(model, grads, stats=None)
    return nnx.to_pure_dict(nnx.state((model, optimizer))), loss

  @jax.jit
  def accuracy(state, x, y):
    model, _ = nnx.merge(graphdef, state)
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)

  return stats_step, plain_step, accuracy


def init(model: Model, tx: optax.GradientTransformation, key: jax.Array, x: jax.Array,
         fisher: str, subsample: int = 1) -> tuple[tuple[Any, ...], Steps]:
  """A training run's initial `carry` and its jitted steps (`make_steps`, `make_nnx_steps`).

  The steps map `(*carry, x, y[, key])` to `(*carry, loss)`; the accuracy reads `carry[0]`.
  linen: `carry = (params, opt_state)`; NNX: `carry = (state,)`, the pure split state of the
  model (built with `nnx.Rngs(key)`) and its `nnx.Optimizer(model, tx, wrt=nnx.Param)`.
  """
  if isinstance(model, nn.Module):
    params = model.init(key, x[:1])['params']
    return (params, tx.init(params)), make_steps(model, tx, fisher, subsample)
  module = model(rngs=nnx.Rngs(key))
  graphdef, state = nnx.split((module, nnx.Optimizer(module, tx, wrt=nnx.Param)))
  return (nnx.to_pure_dict(state),), make_nnx_steps(graphdef, fisher, subsample)


def batch_indices(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
  """(steps, batch_size) example indices: one fresh permutation per epoch, partial batch dropped."""
  rng = np.random.default_rng(seed)
  per_epoch = n // batch_size
  epochs = -(-steps // per_epoch)
  order = [rng.permutation(n)[:per_epoch * batch_size] for _ in range(epochs)]
  return np.concatenate(order).reshape(-1, batch_size)[:steps]


# One evaluation: (step, test accuracy, training seconds so far, the last step's loss).
Eval = tuple[int, float, float, float]


def pack(carry: tuple[Any, ...], evals: list[Eval], slots: int) -> dict:
  """A run's checkpointed state: its `carry` and its evaluations so far.

  `Checkpoints` saves one pytree of arrays and restores them into fixed shapes, so the
  evaluations are a float64 array (exact for the float32 accuracies and losses and the int steps)
  of `slots` rows, the run's number of evaluations, NaN after the last (more rows if a resumed run
  has more evaluations, under a smaller `--eval_every`)."""
  table = np.full((max(slots, len(evals)), 4), np.nan)
  table[:len(evals)] = np.reshape(evals, (-1, 4))
  return {'carry': tuple(carry), 'evals': table}


def unpack(state: dict) -> tuple[tuple[Any, ...], list[Eval]]:
  """`pack`'s inverse: the carry and the evaluations."""
  table = state['evals'][~np.isnan(state['evals'][:, 0])]
  return tuple(state['carry']), [(int(s), float(a), float(t), float(l)) for s, a, t, l in table]


def summarize(evals: list[Eval], target: float) -> dict:
  """`train`'s results from its evaluations (see `train`): computed, not carried, so that a
  resumed run reports what an uninterrupted one does."""
  reached = next((e for e in evals if e[1] >= target and np.isfinite(e[3])), None)
  step, acc, _, loss = evals[-1]
  return {
      'steps_to_target': None if reached is None else reached[0],
      'seconds_to_target': None if reached is None else reached[2],
      'final_accuracy': acc,
      'diverged': not np.isfinite(loss),
      'steps': step,
      'history': [(s, a) for s, a, _, _ in evals],
  }


def state_digest(carry: tuple[Any, ...]) -> str:
  """A SHA-256 of the train state's bytes (parameters and optimizer state), to compare runs
  exactly (an interrupted and resumed run with an uninterrupted one). `_common.params_digest`
  is its multi-device twin, not imported: benchmarks load this file on its own."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(carry):
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()


def train(
    model: Model,
    tx: optax.GradientTransformation,
    data: Data,
    *,
    steps: int,
    seed: int = 0,
    stats_every: int | None = None,
    fisher: str = 'mc',
    subsample: int = 1,
    target: float = 0.97,
    eval_every: int = 10,
    batch_size: int = BATCH_SIZE,
    stop_at_target: bool = False,
    monitor: Any = None,
    checkpoints: Any = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    stop_at: int | None = None,
) -> dict:
  """Trains `model` (linen, or an NNX model class: see `init`) with `tx` for `steps` minibatch
  steps, evaluating every `eval_every`.

  With `stats_every` set, `tx` must be K-FAC-based: every `stats_every`-th step (the first
  included) computes curvature statistics (from every `subsample`-th example of its batch),
  the rest pass `stats=None`. Training stops early
  when the loss is no longer finite, or at the target with `stop_at_target`. Returns
  `steps_to_target` and `seconds_to_target` (None if the target test accuracy was never
  reached), `final_accuracy`, `diverged`, `steps` run, the accuracy `history` as (step,
  accuracy) pairs, `start_step` (0, or the checkpoint's step) and `state_digest`. `monitor`: an
  `examples/_monitor.py` `Monitor` (progress bar, CSV, TensorBoard) that receives each new
  evaluation's loss and test accuracy; it is not closed here.

  `checkpoints`: an `examples/_monitor.py` `Checkpoints`, or None. If it holds a checkpoint, the
  run continues from the latest (returning at once if that run had finished); it saves every
  `checkpoint_every` steps, at the end, and after the evaluation at or past `stop_at`, where the
  run stops as if interrupted. Saves land on evaluations: `checkpoint_every` and `stop_at` should
  be multiples of `eval_every`. Not closed here.
  """
  key = jax.random.key(seed)
  init_key, stats_key = jax.random.split(key)
  x_test, y_test = jnp.asarray(data['x_test']), jnp.asarray(data['y_test'])
  carry, (stats_step, plain_step, accuracy) = init(model, tx, init_key, x_test, fisher,
                                                   subsample)
  plan = batch_indices(len(data['y_train']), max(steps, 2), batch_size, seed)
  slots = -(-steps // eval_every)  # evaluations in a full run
  evals: list[Eval] = []
  if checkpoints is not None and checkpoints.latest() is not None:
    carry, evals = unpack(checkpoints.restore(pack(carry, evals, slots))[1])

  def finished(summary: dict) -> bool:
    """Whether a run with these results (`summarize`) has ended; a checkpoint may say so."""
    return (summary['steps'] >= steps or summary['diverged']
            or (stop_at_target and summary['steps_to_target'] is not None))

  def step(i: int, carry: tuple[Any, ...]) -> tuple[Any, ...]:
    x, y = data['x_train'][plan[i]], data['y_train'][plan[i]]
    if stats_every is not None and i % stats_every == 0:
      return stats_step(*carry, x, y, jax.random.fold_in(stats_key, i))
    return plain_step(*carry, x, y)

  start = evals[-1][0] if evals else 0

  def result() -> dict:
    return {**summarize(evals, target), 'start_step': start, 'state_digest': state_digest(carry)}

  if evals and finished(summarize(evals, target)):
    return result()

  # Compile everything before the clock starts (the results are thrown away).
  jax.block_until_ready([step(0, carry), step(1, carry), accuracy(carry[0], x_test, y_test)])

  i, elapsed = start, evals[-1][2] if evals else 0.0
  while True:
    begin, first = time.perf_counter(), i
    for _ in range(min(eval_every, steps - i)):
      *carry, loss = step(i, carry)
      i += 1
    jax.block_until_ready(carry)
    elapsed += time.perf_counter() - begin  # the clock: training only, not evaluation or saving
    evals.append((i, float(accuracy(carry[0], x_test, y_test)), elapsed, float(loss)))
    if monitor is not None:
      monitor.advance(i - first)
      monitor.log(i, loss=evals[-1][3], test_accuracy=evals[-1][1])
    done = finished(summarize(evals, target))
    stop = stop_at is not None and i >= stop_at
    if checkpoints is not None and (done or stop or i % checkpoint_every == 0):
      checkpoints.save(i, pack(carry, evals, slots), force=True)
    if done or stop:
      return result()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=500, help='training steps per run')
  p.add_argument('--target', type=float, default=0.97, help='target test accuracy')
  p.add_argument('--eval_every', type=int, default=10, help='steps between evaluations')
  p.add_argument('--stats_every', type=int, default=KFAC_DEFAULTS['stats_every'],
                 help='steps between K-FAC statistics')
  p.add_argument('--inverse_every', type=int, default=KFAC_DEFAULTS['inverse_every'],
                 help='updates between K-FAC eigendecompositions / inverses')
  p.add_argument('--damping', type=float, default=KFAC_DEFAULTS['damping'])
  p.add_argument('--damping_mode', choices=('eigen', 'factored'),
                 default=KFAC_DEFAULTS['damping_mode'])
  p.add_argument('--norm_constraint', type=float, default=KFAC_DEFAULTS['norm_constraint'],
                 help='K-FAC update norm bound (KL clipping); 0 turns it off')
  p.add_argument('--ema_decay', type=float, default=KFAC_DEFAULTS['ema_decay'])
  p.add_argument('--fisher', choices=('mc', 'empirical'), default=KFAC_DEFAULTS['fisher'])
  p.add_argument('--subsample', type=int, default=1,
                 help='K-FAC statistics from every k-th example of the batch')
  p.add_argument('--kfac_lr', type=float, default=KFAC_DEFAULTS['learning_rate'])
  p.add_argument('--sgd_lr', type=float, default=SGD_LEARNING_RATE)
  p.add_argument('--adam_lr', type=float, default=ADAM_LEARNING_RATE)
  p.add_argument('--seed', type=int, default=0, help='init and shuffling seed')
  p.add_argument('--models', default='mlp,cnn', help='comma-separated: mlp, cnn')
  p.add_argument('--api', choices=('linen', 'nnx'), default='linen',
                 help='the models in Flax linen or Flax NNX')
  p.add_argument('--json', metavar='PATH', help='also write the results as JSON')
  p.add_argument('--log_dir', metavar='DIR',
                 help='per run (model and optimizer), DIR/<model>-<optimizer>/: metrics.csv,'
                      ' TensorBoard events and, at its end, a PNG plot per metric')
  p.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True,
                 help='a progress bar per run (images/s, loss, ETA) on stderr')
  p.add_argument('--checkpoint_dir', metavar='DIR',
                 help='per run, DIR/<model>-<optimizer>/: orbax checkpoints of the train state'
                      ' (parameters, optimizer state, the evaluations so far)')
  p.add_argument('--checkpoint_every', type=int, default=CHECKPOINT_EVERY,
                 help='steps between checkpoints (and one at the end); a multiple of'
                      ' --eval_every')
  p.add_argument('--resume', action='store_true',
                 help='continue each run from its latest checkpoint in --checkpoint_dir, exactly'
                      ' where it stopped (the same flags: the batches and K-FAC\'s sampling keys'
                      ' are functions of the seed and the step); a run without one starts anew')
  p.add_argument('--stop_at', type=int, metavar='STEP',
                 help='stop each run after this update as if interrupted (saving a checkpoint);'
                      ' to test --resume; a multiple of --eval_every')
  args = p.parse_args(argv)
  if args.steps < 1 or args.eval_every < 1:
    p.error('--steps and --eval_every must be >= 1')
  check_checkpoint_args(args)
  return args


def check_checkpoint_args(args: argparse.Namespace) -> None:
  """The examples' checks of the checkpoint flags (`_monitor.check_checkpoint_flags`), and one of
  digits' own: checkpoints and stops land on evaluations, since a checkpoint holds the test
  accuracies so far."""
  from _monitor import check_checkpoint_flags

  check_checkpoint_flags(args)
  for name in ('checkpoint_every', 'stop_at') if args.checkpoint_dir else ('stop_at',):
    value = getattr(args, name)
    if value is not None and value % args.eval_every:
      raise SystemExit(f'--{name} {value} must be a multiple of --eval_every {args.eval_every}'
                       ' (a checkpoint ends an evaluation).')


def open_checkpoints(args: argparse.Namespace, runs: list[str]) -> dict[str, Any]:
  """Each run's `Checkpoints` (`examples/_monitor.py`) in `--checkpoint_dir`/<run>/, checked
  against `--resume` and `--steps` before any run trains."""
  from _monitor import Checkpoints  # orbax

  found = {run: Checkpoints(os.path.join(args.checkpoint_dir, run), args.checkpoint_every)
           for run in runs}
  latest = {run: c.latest() for run, c in found.items() if c.latest() is not None}
  try:
    if args.resume and not latest:
      raise SystemExit(f'--resume: no checkpoint in --checkpoint_dir {args.checkpoint_dir}.')
    if not args.resume and latest:
      run, step = next(iter(latest.items()))
      raise SystemExit(f'--checkpoint_dir {args.checkpoint_dir} has checkpoints ({run} up to'
                       f' step {step}): add --resume, or use an empty folder.')
    for run, step in latest.items():
      if step > args.steps:
        raise SystemExit(f'--resume: the checkpoint of {run} is at step {step}, past the'
                         f' {args.steps} steps of this run.')
  except SystemExit:
    for c in found.values():
      c.close()
    raise
  return found


def run(args: argparse.Namespace) -> list[dict]:
  """Every requested model with K-FAC, SGD with momentum and Adam; one result row each."""
  data = load_data()
  first = data['x_train'][:BATCH_SIZE], data['y_train'][:BATCH_SIZE]  # the batches' shapes
  names = [name.strip() for name in args.models.split(',')]
  runs = [f'{name}-{opt}' for name in names for opt in OPTIMIZERS]
  checkpoints = open_checkpoints(args, runs) if args.checkpoint_dir else {}
  rows = []
  for name in names:
    model = MODELS[name]() if args.api == 'linen' else NNX_MODELS[name]
    optimizers = {
        'kfac': (args.kfac_lr, kfac_optimizer(
            layer_table(model, *first), args.kfac_lr, damping=args.damping,
            damping_mode=args.damping_mode, norm_constraint=args.norm_constraint or None,
            ema_decay=args.ema_decay, inverse_every=args.inverse_every)),
        'sgd': (args.sgd_lr, optax.sgd(args.sgd_lr, momentum=0.9)),
        'adam': (args.adam_lr, optax.adam(args.adam_lr)),
    }
    for opt in OPTIMIZERS:
      (lr, tx), saved = optimizers[opt], checkpoints.get(f'{name}-{opt}')
      start = (saved.latest() if saved else None) or 0
      if start:
        print(f'{name}-{opt}: resuming from its checkpoint at step {start}')
      monitor = None
      if args.log_dir or args.progress:
        from _monitor import Monitor  # examples/_monitor.py: tqdm, tensorboardX, matplotlib

        log_dir = os.path.join(args.log_dir, f'{name}-{opt}') if args.log_dir else None
        monitor = Monitor(log_dir, args.steps, BATCH_SIZE, start, show=args.progress)
      result = train(model, tx, data, steps=args.steps, seed=args.seed, target=args.target,
                     eval_every=args.eval_every, fisher=args.fisher, subsample=args.subsample,
                     stats_every=args.stats_every if opt == 'kfac' else None, monitor=monitor,
                     checkpoints=saved, checkpoint_every=args.checkpoint_every,
                     stop_at=args.stop_at)
      if monitor is not None:
        monitor.close()
      if saved is not None:
        saved.close()
      rows.append({'model': name, 'optimizer': opt, 'learning_rate': lr, **result})
  return rows


def print_table(rows: list[dict], target: float) -> None:
  print(f'{"model":<6}{"optimizer":<11}{"lr":>8}{f"steps to {target:.0%}":>15}'
        f'{"seconds":>10}{"final acc":>11}')
  for r in rows:
    reached = r['steps_to_target'] is not None
    steps = str(r['steps_to_target']) if reached else f'>{r["steps"]}'
    if r['diverged']:
      steps = f'diverged@{r["steps"]}'
    seconds = f'{r["seconds_to_target"]:.2f}' if reached else '-'
    print(f'{r["model"]:<6}{r["optimizer"]:<11}{r["learning_rate"]:>8g}{steps:>15}'
          f'{seconds:>10}{r["final_accuracy"]:>11.4f}')


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, flax {args.api};'
        f' K-FAC: damping={args.damping} ({args.damping_mode}),'
        f' norm_constraint={args.norm_constraint or None},'
        f' ema_decay={args.ema_decay}, inverse_every={args.inverse_every},'
        f' stats_every={args.stats_every}, fisher={args.fisher}, subsample={args.subsample}')
  rows = run(args)
  print_table(rows, args.target)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'results': rows}, f, indent=2)


if __name__ == '__main__':
  main()
