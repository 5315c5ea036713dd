"""What `mnist.py`, `cifar10.py` and `resnet_imagenet.py` share: flags, the device mesh, data, the
jitted steps, the training loop, evaluation and logging.

Data parallelism: a 1-D mesh axis 'data' over the devices (of every process with
`--distributed`), the global batch sharded over it and everything else replicated; each step is
`jax.jit(jax.shard_map(...))`. K-FAC is `optax.chain(kfax.kfac(table, axis_name='data'), ...,
optax.sgd(lr, momentum))`, `table` the loss's layer table as one device sees it (`layer_table`):
kfax averages its statistics over the axis and splits its refreshes across the devices (with
`--gather gradients` each device also keeps only its own layers' curvature, and the state's
specs come from `kfax.partition_specs`); gradients are averaged here, once per update
(`jax.lax.pmean`). BatchNorm (`axis_name='data'`) uses the global batch's statistics.

Two compiled training steps, as in `examples/digits.py`: every `--stats_every`-th step calls
`kfax.value_grad_and_stats` and passes `stats=`; the others call `jax.value_and_grad` and pass
`stats=None`. Both are compiled ahead of time (`jit(...).lower(...).compile()`), so a changed
input shape or sharding raises instead of recompiling, and the compile time is reported apart.
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kfax

AXIS = 'data'
Batch = tuple[np.ndarray, np.ndarray, np.ndarray]  # process-local images, labels, weights


@dataclasses.dataclass(frozen=True)
class Task:
  """One example: its data set, model and default flags."""

  name: str
  tfds_name: str
  test_split: str
  image_size: int
  channels: int
  classes: int
  mean: tuple[float, ...]  # per-channel, of images in [0, 1] (tfds only)
  std: tuple[float, ...]
  flip: bool  # random horizontal flips for training (tfds only)
  make_model: Callable[[argparse.Namespace], nn.Module]
  defaults: dict[str, Any]  # flag defaults
  optimizer_defaults: dict[str, dict[str, float]]  # {'kfac': {'lr': .., 'momentum': ..}, ...}


class TrainState(NamedTuple):
  params: Any
  batch_stats: Any  # {} for models without BatchNorm
  opt_state: Any
  key: jax.Array  # for the MC Fisher's sampled targets


def batch_norm(train: bool, **kwargs: Any) -> nn.BatchNorm:
  """BatchNorm over the global batch: the mean and variance are averaged over 'data'."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=AXIS,
                      **kwargs)


# ------------------------------------------------------------------------------------- flags


def parse_args(task: Task, doc: str, argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=doc.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add = p.add_argument
  add('--data', choices=('tfds', 'synthetic'), default='tfds',
      help='tensorflow_datasets, or a learnable synthetic set of the same shapes (no download)')
  add('--data_dir', help='tensorflow_datasets data directory')
  add('--synthetic_size', type=int, default=10_000,
      help='synthetic training examples (an epoch); the test set has a fifth as many')
  add('--image_size', type=int, default=task.image_size, help='square image side')
  add('--num_classes', type=int, default=task.classes, help='classes (synthetic data only)')
  add('--width', type=int, help='model width (see the model docstring)')
  add('--distributed', action='store_true',
      help='call jax.distributed.initialize() first (mpirun, SLURM, ...)')
  add('--num_devices', type=int, help='devices on the mesh (default: all)')
  add('--batch_size', type=int, help='global batch size, over all devices and micro-batches')
  add('--acc_iters', type=int, default=1, help='micro-batches accumulated per update')
  add('--eval_batch_size', type=int, help='global (default: batch_size // acc_iters)')
  add('--steps', type=int, help='updates (default: --epochs of the training set)')
  add('--epochs', type=float)
  add('--optimizer', choices=('kfac', 'sgd', 'adam'), default='kfac')
  add('--lr', type=float, help='peak learning rate (default: per optimizer)')
  add('--momentum', type=float, help='SGD momentum for kfac and sgd (default: per optimizer)')
  add('--weight_decay', type=float, default=0.0, help='on kernels, after preconditioning')
  add('--lr_schedule', choices=('constant', 'cosine', 'poly'), default='constant')
  add('--decay_start_epoch', type=float, default=0.0, help='poly: constant until this epoch')
  add('--poly_power', type=float, default=2.0, help='poly: the exponent')
  add('--poly_end_epoch', type=float, help='poly: the epoch it reaches 0 (default: the last)')
  add('--damping', type=float, default=1e-4)
  add('--damping_mode', choices=('eigen', 'factored'), default='factored')
  add('--norm_constraint', type=float, default=1e-3, help='K-FAC KL clipping; 0 turns it off')
  add('--ema_decay', type=float, default=0.95, help='weight of the old K-FAC factor')
  add('--stats_every', type=int, default=5, help='steps between K-FAC statistics')
  add('--inverse_every', type=int, default=10, help='updates between K-FAC refreshes')
  add('--fisher', choices=('mc', 'empirical'), default='mc')
  add('--comm_dtype', choices=('float32', 'bfloat16'), default='float32',
      help="dtype of kfax's statistics all-reduce")
  add('--gather', choices=('decompositions', 'gradients'), default='decompositions',
      help='K-FAC across devices: replicate the decompositions (least communication) or keep'
           ' each layer on one device and gather preconditioned gradients (least memory)')
  add('--log_every', type=int, default=50, help='steps between loss logs (host syncs)')
  add('--eval_every', type=int, default=0, help='steps between evaluations (0: at the end)')
  add('--seed', type=int, default=0)
  add('--json', metavar='PATH', help='write the logged losses, accuracies and timings')
  p.set_defaults(**task.defaults)
  args = p.parse_args(argv)
  for name, value in task.optimizer_defaults[args.optimizer].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def check_args(args: argparse.Namespace, task: Task, devices: int) -> None:
  """Raises SystemExit for sizes that do not split evenly."""
  per_update = devices * args.acc_iters
  if args.batch_size % per_update or args.batch_size % jax.process_count():
    raise SystemExit(f'--batch_size {args.batch_size} must be divisible by devices x acc_iters'
                     f' = {per_update} and by the {jax.process_count()} processes.')
  if args.eval_batch_size % devices or args.eval_batch_size % jax.process_count():
    raise SystemExit(f'--eval_batch_size {args.eval_batch_size} must be divisible by the'
                     f' {devices} devices.')
  if args.data == 'tfds' and args.num_classes != task.classes:
    raise SystemExit(f'--num_classes: {task.tfds_name} has {task.classes} classes.')


# -------------------------------------------------------------------------------------- mesh


def make_mesh(num_devices: int | None) -> Mesh:
  """A 1-D mesh axis 'data' over the first `num_devices` devices (default: all, every host)."""
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices) or (jax.process_count() > 1 and n != len(devices)):
    raise SystemExit(f'--num_devices {n}: {len(devices)} devices available'
                     f' ({jax.process_count()} processes need all of them).')
  return jax.make_mesh((n,), (AXIS,), axis_types=(AxisType.Explicit,), devices=devices[:n])


def global_array(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """The global batch, sharded over 'data', from this process's slice of it."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local)


# -------------------------------------------------------------------------------------- data


class Synthetic:
  """A learnable, deterministic stand-in: example i's label is drawn from seed (seed, i), its
  image is its class's template (random 4x4 blocks, upsampled) plus as much Gaussian noise, with
  unit variance in all (like standardized images)."""

  def __init__(self, args: argparse.Namespace, channels: int):
    self.size, self.seed, self.classes = args.synthetic_size, args.seed, args.num_classes
    self.shape = (args.image_size, args.image_size, channels)
    rng = np.random.default_rng((args.seed, 0, 0))
    self.templates = rng.standard_normal((self.classes, 4, 4, channels), dtype=np.float32)

  def examples(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w, _ = self.shape
    xs, ys = np.empty((len(indices), *self.shape), np.float32), np.empty(len(indices), np.int32)
    for k, i in enumerate(indices):
      rng = np.random.default_rng((self.seed, 1, int(i)))
      ys[k] = rng.integers(self.classes)
      block = self.templates[ys[k]].repeat(-(-h // 4), 0).repeat(-(-w // 4), 1)[:h, :w]
      xs[k] = (block + rng.standard_normal(self.shape, dtype=np.float32)) * np.sqrt(0.5)
    return xs, ys


def synthetic_batches(args: argparse.Namespace, task: Task, local_batch: int,
                      train: bool) -> Iterator[Batch]:
  """This process's slices of the global batches: training cycles through `synthetic_size`
  examples forever; the test set (the next fifth) is padded to whole batches with weight 0."""
  data = Synthetic(args, task.channels)
  start = jax.process_index() * local_batch
  global_batch = local_batch * jax.process_count()
  if train:
    for step in range(2**62):
      idx = (step * global_batch + start + np.arange(local_batch)) % data.size
      yield (*data.examples(idx), np.ones(local_batch, np.float32))
  test = data.size // 5
  for first in range(0, test, global_batch):
    idx = first + start + np.arange(local_batch)
    yield (*data.examples(data.size + np.minimum(idx, test - 1)),
           (idx < test).astype(np.float32))


def tfds_batches(args: argparse.Namespace, task: Task, local_batch: int,
                 train: bool) -> Iterator[Batch]:
  """This process's batches of its share of the split (`tfds.split_for_jax_process`); the test
  split is padded with weight-0 examples so that every process runs as many batches."""
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError:
    raise SystemExit('--data tfds needs TensorFlow Datasets: `pip install tensorflow'
                     ' tensorflow-datasets`; or run with --data synthetic (no download).') from None
  tf.config.set_visible_devices([], 'GPU')  # leave the accelerators to JAX
  split = 'train' if train else task.test_split
  ds, info = tfds.load(task.tfds_name, split=tfds.split_for_jax_process(split), with_info=True,
                       as_supervised=True, shuffle_files=train, data_dir=args.data_dir)
  size, mean, std = args.image_size, tf.constant(task.mean), tf.constant(task.std)

  def prepare(image, label):
    image = tf.image.resize(tf.cast(image, tf.float32) / 255.0, (size, size))
    if train and task.flip:
      image = tf.image.random_flip_left_right(image)
    return (image - mean) / std, tf.cast(label, tf.int32), tf.constant(1.0)

  if train:
    ds = ds.repeat().shuffle(10 * local_batch, seed=args.seed)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  if train:
    return iter(tfds.as_numpy(ds.batch(local_batch, drop_remainder=True).prefetch(2)))
  pad = tf.data.Dataset.from_tensors(
      (tf.zeros((size, size, task.channels)), tf.constant(0), tf.constant(0.0))).repeat()
  per_process = -(-info.splits[task.test_split].num_examples // jax.process_count())
  batches = ds.concatenate(pad).batch(local_batch).take(-(-per_process // local_batch))
  return iter(tfds.as_numpy(batches))


def train_size(args: argparse.Namespace, task: Task) -> int:
  if args.data == 'synthetic':
    return args.synthetic_size
  import tensorflow_datasets as tfds  # tfds_batches has checked that it is installed
  return tfds.builder(task.tfds_name, data_dir=args.data_dir).info.splits['train'].num_examples


def batches(args: argparse.Namespace, task: Task, global_batch: int,
            train: bool) -> Iterator[Batch]:
  source = synthetic_batches if args.data == 'synthetic' else tfds_batches
  return source(args, task, global_batch // jax.process_count(), train)


# --------------------------------------------------------------------------------- optimizer


def learning_rate(args: argparse.Namespace, steps: int, steps_per_epoch: int) -> optax.Schedule:
  if args.lr_schedule == 'cosine':
    return optax.cosine_decay_schedule(args.lr, steps)
  if args.lr_schedule == 'poly':  # chainerkfac's: constant, then lr (1 - t / T)^p
    begin = int(args.decay_start_epoch * steps_per_epoch)
    end = int((args.poly_end_epoch or steps / steps_per_epoch) * steps_per_epoch)
    return optax.polynomial_schedule(args.lr, 0.0, args.poly_power, max(end - begin, 1), begin)
  return optax.constant_schedule(args.lr)


def make_optimizer(args: argparse.Namespace, schedule: optax.Schedule,
                   table: kfax.LayerTable | None) -> optax.GradientTransformationExtraArgs:
  """K-FAC + SGD with momentum, SGD with momentum, or AdamW; decay on kernels only. `table`:
  the loss's layer table (`layer_table`), for K-FAC."""
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  if args.optimizer == 'adam':
    return optax.chain(optax.adamw(schedule, weight_decay=args.weight_decay, mask=kernels))
  decay = [optax.add_decayed_weights(args.weight_decay, kernels)] if args.weight_decay else []
  sgd = optax.sgd(schedule, momentum=args.momentum)
  if args.optimizer == 'sgd':
    return optax.chain(*decay, sgd)
  kfac = kfax.kfac(table, damping=args.damping, ema_decay=args.ema_decay,
                   inverse_every=args.inverse_every, damping_mode=args.damping_mode,
                   norm_constraint=args.norm_constraint or None, axis_name=AXIS,
                   comm_dtype=args.comm_dtype, gather=args.gather)
  return optax.chain(kfac, *decay, sgd)


# ------------------------------------------------------------------------------------- steps


def init_variables(model: nn.Module, mesh: Mesh, shape: tuple[int, ...],
                   seed: int) -> tuple[Any, Any, jax.Array]:
  """The replicated params, batch_stats ({} without BatchNorm) and the MC sampling key."""

  def init(key: jax.Array) -> tuple[Any, Any, jax.Array]:
    init_key, state_key = jax.random.split(key)
    variables = model.init(init_key, jnp.zeros((1, *shape)), train=False)
    return variables['params'], variables.get('batch_stats', {}), state_key

  return jax.jit(init, out_shardings=NamedSharding(mesh, P()))(jax.random.key(seed))


def make_loss(model: nn.Module) -> Callable:
  """`loss(params, images, labels, *, batch_stats) -> (mean loss, new batch_stats)`."""

  def loss_fn(params, x, y, *, batch_stats):
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
    return kfax.softmax_cross_entropy(logits, y), new.get('batch_stats', {})

  return loss_fn


def stats_fn(model: nn.Module, args: argparse.Namespace) -> Callable:
  return kfax.value_grad_and_stats(make_loss(model), has_aux=True, fisher=args.fisher)


def layer_table(model: nn.Module, args: argparse.Namespace, mesh: Mesh, params: Any,
                batch_stats: Any, shape: tuple[int, ...]) -> kfax.LayerTable:
  """K-FAC's layer table: one shape-only trace of the loss as each device sees it inside the
  training step, on its share of one micro-batch. The trace runs inside `shard_map` too, where
  BatchNorm's mean over 'data' finds its axis."""
  grad_fn, tables = stats_fn(model, args), []

  def probe(params, batch_stats, x, y):
    local = jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to='varying'), params)
    tables.append(grad_fn.layers(local, x, y, batch_stats=batch_stats))
    return jnp.zeros(())

  micro = args.batch_size // args.acc_iters  # over all devices; the step's per-device share
  batch = NamedSharding(mesh, P(AXIS))
  jax.eval_shape(jax.shard_map(probe, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                               out_specs=P()),
                 params, batch_stats, jax.ShapeDtypeStruct((micro, *shape), jnp.float32,
                                                           sharding=batch),
                 jax.ShapeDtypeStruct((micro,), jnp.int32, sharding=batch))
  return tables[0]


def init_state(tx: optax.GradientTransformation, mesh: Mesh, params: Any, batch_stats: Any,
               key: jax.Array) -> tuple[TrainState, TrainState]:
  """The train state and its `shard_map` specs: everything is replicated, except the share of
  K-FAC's state each device keeps with `--gather gradients` (`kfax.partition_specs`)."""
  shapes = jax.eval_shape(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=P(),
                                        check_vma=False), params)
  opt_specs = kfax.partition_specs(shapes, AXIS)
  opt_state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=opt_specs))(
      params)
  return TrainState(params, batch_stats, opt_state, key), TrainState(P(), P(), opt_specs, P())


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    specs: TrainState, args: argparse.Namespace, with_stats: bool) -> Callable:
  """`step(state, images, labels) -> (state, mean loss)`, jitted over the mesh, state donated."""

  if with_stats:
    grad_fn = stats_fn(model, args)
  else:
    grad_fn = jax.value_and_grad(make_loss(model), has_aux=True)
  grad_fn = kfax.accumulate(grad_fn, args.acc_iters)  # a mean over micro-batches

  def step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
    key, sample_key = jax.random.split(state.key)
    # Device-varying parameters: gradients stay local (under check_vma, gradients of replicated
    # parameters would be summed over devices inside every micro-batch) and are averaged once.
    local = jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to='varying'), state.params)
    if with_stats:
      sample_key = jax.random.fold_in(sample_key, jax.lax.axis_index(AXIS))
      (loss, batch_stats), grads, stats = grad_fn(local, x, y, rng=sample_key,
                                                  batch_stats=state.batch_stats)
    else:
      (loss, batch_stats), grads = grad_fn(local, x, y, batch_stats=state.batch_stats)
      stats = None
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, stats=stats)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params, batch_stats, opt_state, key), jax.lax.pmean(loss, AXIS)

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(specs, P(AXIS), P(AXIS)),
                          out_specs=(specs, P()))
  return jax.jit(sharded, donate_argnums=0)


def make_eval_step(model: nn.Module, mesh: Mesh) -> Callable:
  """`eval(params, batch_stats, images, labels, weights) -> (weighted correct, weight)` over the
  global batch."""

  def evaluate(params, batch_stats, x, y, w):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=False)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * w)
    return jax.lax.psum(correct, AXIS), jax.lax.psum(jnp.sum(w), AXIS)

  return jax.jit(jax.shard_map(evaluate, mesh=mesh, in_specs=(P(), P(), *[P(AXIS)] * 3),
                               out_specs=(P(), P())))


def accuracy(eval_step: Callable, state: TrainState, mesh: Mesh, args: argparse.Namespace,
             task: Task) -> float:
  """Test accuracy over the whole test split (one host sync, at the end)."""
  correct = total = 0.0
  for x, y, w in batches(args, task, args.eval_batch_size, train=False):
    batch = (global_array(mesh, a) for a in (x, y, w))
    c, n = eval_step(state.params, state.batch_stats, *batch)
    correct, total = correct + c, total + n
  return float(correct) / float(total)


# -------------------------------------------------------------------------------------- loop


def log(*message: Any) -> None:
  if jax.process_index() == 0:
    print(*message, flush=True)


def train(task: Task, args: argparse.Namespace) -> dict:
  """Trains `task`'s model; returns the logged losses, accuracies and timings."""
  mesh = make_mesh(args.num_devices)
  devices = mesh.devices.size
  args.eval_batch_size = args.eval_batch_size or args.batch_size // args.acc_iters
  check_args(args, task, devices)
  train_batches = batches(args, task, args.batch_size, train=True)  # checks tfds first
  steps_per_epoch = max(train_size(args, task) // args.batch_size, 1)
  steps = args.steps or max(int(args.epochs * steps_per_epoch), 1)
  schedule = learning_rate(args, steps, steps_per_epoch)
  model = task.make_model(args)
  shape = (args.image_size, args.image_size, task.channels)
  params, batch_stats, key = init_variables(model, mesh, shape, args.seed)
  table = (layer_table(model, args, mesh, params, batch_stats, shape)
           if args.optimizer == 'kfac' else None)
  tx = make_optimizer(args, schedule, table)
  state, specs = init_state(tx, mesh, params, batch_stats, key)
  log(f'{task.name}: {type(model).__name__}, {args.optimizer}, jax {jax.__version__},'
      f' {devices} {jax.devices()[0].platform} devices in {jax.process_count()} processes,'
      f' global batch {args.batch_size} ({args.acc_iters} micro-batches), {steps} steps')

  x, y, _ = next(train_batches)
  x, y = global_array(mesh, x), global_array(mesh, y)
  start = time.perf_counter()
  kfac = args.optimizer == 'kfac'
  compiled = {s: make_train_step(model, tx, mesh, specs, args, s).lower(state, x, y).compile()
              for s in ({True, False} if kfac and args.stats_every > 1 else {kfac})}
  eval_step = make_eval_step(model, mesh)
  compile_seconds = time.perf_counter() - start
  log(f'compiled {len(compiled)} training steps in {compile_seconds:.1f} s')

  history, evals = [], []
  clock = {'seconds': 0.0, 'mark': time.perf_counter()}

  def tick() -> float:
    """Training seconds so far: wall-clock time outside evaluation."""
    now = time.perf_counter()
    clock['seconds'] += now - clock['mark']
    clock['mark'] = now
    return clock['seconds']

  for i in range(steps):
    if i:
      x, y, _ = next(train_batches)
      x, y = global_array(mesh, x), global_array(mesh, y)
    state, loss = compiled[kfac and i % args.stats_every == 0](state, x, y)
    if i % args.log_every == 0 or i == steps - 1:
      loss = float(loss)  # the only host sync of training
      last = history[-1] if history else {'step': -1, 'seconds': 0.0}
      history.append({'step': i, 'loss': loss, 'seconds': tick()})
      per_step = (history[-1]['seconds'] - last['seconds']) / (i - last['step'])
      log(f'step {i:>6}  loss {loss:.4f}  lr {float(schedule(i)):.4g}'
          f'  {1e3 * per_step:.1f} ms/step')
      if not math.isfinite(loss):
        log('loss is not finite: stopping')
        break
    if args.eval_every and (i + 1) % args.eval_every == 0 and i != steps - 1:
      jax.block_until_ready(state)
      tick()
      evals.append({'step': i + 1, 'accuracy': accuracy(eval_step, state, mesh, args, task)})
      log(f'step {i + 1:>6}  test accuracy {evals[-1]["accuracy"]:.4f}')
      clock['mark'] = time.perf_counter()
  jax.block_until_ready(state)
  train_seconds = tick()
  evals.append({'step': i + 1, 'accuracy': accuracy(eval_step, state, mesh, args, task)})
  log(f'final test accuracy {evals[-1]["accuracy"]:.4f} after {i + 1} steps,'
      f' {train_seconds:.1f} s of training')
  return {
      'task': task.name, 'args': vars(args), 'jax_version': jax.__version__,
      'devices': devices, 'processes': jax.process_count(), 'steps': i + 1,
      'losses': history, 'evals': evals, 'final_accuracy': evals[-1]['accuracy'],
      'compile_seconds': compile_seconds, 'train_seconds': train_seconds,
      'seconds_per_step': train_seconds / (i + 1),
  }


def main(task: Task, doc: str, argv: list[str] | None = None) -> dict:
  args = parse_args(task, doc, argv)
  if args.distributed:
    jax.distributed.initialize()  # finds the coordinator under mpirun, SLURM, ...
  result = train(task, args)
  if args.json and jax.process_index() == 0:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return result
