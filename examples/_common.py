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

chainerkfac's ImageNet recipe (`recipe.py`), each off unless a flag or a `--config` turns it on:
`--lr_schedule poly` is its polynomial decay over fractional epochs (updates x batch / training
set size; `--epochs` rounds up to whole updates); `--no-momentum_correction` its heavy ball
without the correction (`recipe.corrected_momentum_sgd(adjust_momentum=False)`; optax's momentum
is the corrected one); `--weight_norm_cap` caps kernel norms, last in the chain; `--mixup_alpha`,
`--running_mixup` and `--random_erasing` run inside the jitted step on each device's share
(`make_augment`: keys folded with the device index, the previous micro-batch carried in
`TrainState.previous`, sharded over 'data', soft labels into `kfax.softmax_cross_entropy`).
Evaluation uses the unmixed, unerased test data and integer labels.

Watching and resuming (`_monitor.py`): a progress bar (images/s, loss, ETA), `--log_dir` for a
metrics CSV, TensorBoard events and PNG plots at the end, evaluation once an epoch (or
`--eval_every`), and orbax checkpoints (`--checkpoint_dir`, `--checkpoint_every`, `--resume`) of
the whole train state: parameters, BatchNorm statistics, optimizer state, the PRNG key and
mixup's carried batch. The training data are a function of (seed, step), and a resumed run
starts at its checkpoint's step, so it ends with exactly the parameters of an uninterrupted run
(synthetic and image-list data; tfds as far as tf.data is deterministic).
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
import recipe
from _monitor import check_checkpoint_flags

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


class Previous(NamedTuple):
  """Mixup's carried batch: each device's previous (mixed and erased, with `--running_mixup`)
  micro-batch and its soft labels, sharded over 'data'; `started` is False before the first
  step (which mixes its first micro-batch with itself: the identity)."""
  images: jax.Array
  labels: jax.Array
  started: jax.Array


class TrainState(NamedTuple):
  params: Any
  batch_stats: Any  # {} for models without BatchNorm
  opt_state: Any
  key: jax.Array  # for the MC Fisher's sampled targets, mixup and random erasing
  previous: Previous | tuple = ()  # mixup's carried batch; () without mixup


def batch_norm(train: bool, **kwargs: Any) -> nn.BatchNorm:
  """BatchNorm over the global batch: the mean and variance are averaged over 'data'. Decay 0.9
  and epsilon 1e-5 unless `kwargs` say otherwise."""
  kwargs = {'momentum': 0.9, 'epsilon': 1e-5, **kwargs}
  return nn.BatchNorm(use_running_average=not train, axis_name=AXIS, **kwargs)


# ------------------------------------------------------------------------------------- flags


def parse_args(task: Task, doc: str, argv: list[str] | None = None) -> argparse.Namespace:
  """The flags: the parser's defaults, then `task.defaults`, then the values of a `--config` file,
  then the command line, each overriding the ones before."""
  import difflib
  import tomllib

  p = argparse.ArgumentParser(description=doc.split('\n\n')[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  flags: dict[str, argparse.Action] = {}  # by name (dest): a config file's fields

  def add(*names: str, **kwargs: Any) -> None:
    action = p.add_argument(*names, **kwargs)
    flags[action.dest] = action

  add('--config', metavar='PATH',
      help='a TOML file of flag values, each field named as its flag without the dashes'
           ' (examples/configs/: chainerkfac\'s ImageNet recipe). Flags given on the command line'
           ' override the file; chainerkfac did the opposite (its JSON configs overrode its'
           ' command line)')
  add('--data', choices=('tfds', 'synthetic', 'imagelist'), default='tfds',
      help='tensorflow_datasets, a learnable synthetic set of the same shapes (no download), or'
           ' image lists ("relative/path label" lines: --train_list, --train_root, --val_list,'
           ' --val_root; chainerkfac\'s input, examples/_data.py)')
  add('--data_dir', help='tensorflow_datasets data directory')
  add('--train_list', metavar='PATH', help='imagelist: the training list')
  add('--train_root', metavar='DIR', help='imagelist: the folder its paths are relative to')
  add('--val_list', metavar='PATH', help='imagelist: the evaluation list')
  add('--val_root', metavar='DIR', help='imagelist: its folder (default: --train_root)')
  add('--mean_file', metavar='PATH',
      help="imagelist: a per-pixel mean image to subtract (the seed's mean.npy); default: the"
           ' ImageNet channel means')
  add('--resize', type=int,
      help='imagelist: resize shorter sides to this before cropping (default: only images'
           ' smaller than the crop, as the seed)')
  add('--loader_workers', type=int, default=8, help='imagelist: decoding threads per process')
  add('--synthetic_size', type=int, default=10_000,
      help='synthetic training examples (an epoch); the test set has a fifth as many')
  add('--image_size', type=int, default=task.image_size, help='square image side')
  add('--num_classes', type=int, default=task.classes, help='classes (synthetic data only)')
  if 'arch' in task.defaults:
    add('--arch', help='model architecture (see the script docstring)')
  add('--width', type=int, help='model width (see the model docstring)')
  add('--distributed', action='store_true',
      help='call jax.distributed.initialize() first (mpirun, SLURM, ...)')
  add('--num_devices', type=int, help='devices on the mesh (default: all)')
  add('--batch_size', type=int, help='global batch size, over all devices and micro-batches')
  add('--acc_iters', type=int, default=1, help='micro-batches accumulated per update')
  add('--eval_batch_size', type=int, help='global (default: batch_size // acc_iters)')
  add('--steps', type=int,
      help='updates (default: --epochs of the training set, fractional epochs rounded up)')
  add('--epochs', type=float)
  add('--optimizer', choices=('kfac', 'sgd', 'adam'), default='kfac')
  add('--lr', type=float, help='peak learning rate (default: per optimizer)')
  add('--momentum', type=float, help='SGD momentum for kfac and sgd (default: per optimizer)')
  add('--dtype', choices=('float32', 'bfloat16'), default='float32',
      help='the model\'s compute dtype (parameters, K-FAC statistics and updates stay float32)')
  add('--momentum_correction', action=argparse.BooleanOptionalAction, default=True,
      help='kfac and sgd: momentum with the learning rate outside the velocity (optax.sgd:'
           ' v = m v + g, w -= lr_t v), which is the same as chainerkfac\'s adjust_momentum:'
           ' its velocity holds the learning rate (v = m v - lr_t g) and, when the learning rate'
           ' falls, m is scaled by lr_t / lr_{t-1} (Goyal et al., 2017). --no-momentum_correction:'
           ' chainerkfac\'s velocity without the correction (a new learning rate applies to new'
           ' gradients only)')
  add('--weight_decay', type=float, default=0.0, help='on kernels, after preconditioning')
  add('--weight_norm_cap', action=argparse.BooleanOptionalAction, default=False,
      help='after each update, scale every conv and dense kernel whose Frobenius norm exceeds'
           ' sqrt(2 d_out), d_out its output features (a flax kernel\'s last axis), down to'
           ' that norm: chainerkfac\'s replacement for weight decay (normalize_weight); not'
           ' BatchNorm parameters or biases')
  add('--lr_schedule', choices=('constant', 'cosine', 'poly'), default='constant')
  add('--decay_start_epoch', type=float, default=0.0, help='poly: constant until this epoch')
  add('--poly_power', type=float, default=2.0, help='poly: the exponent')
  add('--poly_end_epoch', type=float,
      help='poly: it reaches 0 at epoch max(this, the last) (chainerkfac\'s polynomial_epoch;'
           ' default: the last). Epochs are fractional (updates x batch / training set size),'
           ' as chainerkfac\'s')
  add('--damping', type=float, default=1e-4)
  add('--damping_mode', choices=('eigen', 'factored'), default='factored')
  add('--norm_constraint', type=float, default=1e-3, help='K-FAC KL clipping; 0 turns it off')
  add('--ema_decay', type=float, default=0.95, help='weight of the old K-FAC factor')
  add('--stats_every', type=int, default=5, help='steps between K-FAC statistics')
  add('--inverse_every', type=int, default=10, help='updates between K-FAC refreshes')
  add('--fisher', choices=('mc', 'empirical'), default='mc')
  add('--subsample', type=int, default=1, metavar='K',
      help="K-FAC statistics from every K-th example of each device's micro-batch"
           ' (value_grad_and_stats(subsample=K)); gradients use every example')
  add('--subsample_positions', type=int, default=1, metavar='K',
      help='K-FAC conv statistics from about 1/K of the output positions, on a lattice'
           ' (value_grad_and_stats(subsample_positions=K))')
  add('--stats_dtype', choices=('bfloat16',), default=None,
      help='K-FAC statistics rows rounded to bfloat16, products accumulated in float32'
           ' (value_grad_and_stats(stats_dtype=)); default: the model\'s compute dtype')
  add('--comm_dtype', choices=('float32', 'bfloat16'), default='float32',
      help="dtype of kfax's statistics all-reduce")
  add('--gather', choices=('decompositions', 'gradients'), default='decompositions',
      help='K-FAC across devices: replicate the decompositions (least communication) or keep'
           ' each layer on one device and gather preconditioned gradients (least memory)')
  add('--refresh', choices=('together', 'staggered'), default='together',
      help='K-FAC refreshes: all factors every --inverse_every updates, or a cost-balanced share'
           ' of them on each update of the period (no step pays for every decomposition)')
  add('--mixup_alpha', type=float, default=0.0, metavar='ALPHA',
      help="chainerkfac's mixup: each training image and its one-hot label are mixed with the"
           ' previous batch\'s (the first batch is not mixed), with weight max(l, 1 - l) on its'
           ' own, l ~ Beta(ALPHA, ALPHA) per image; 0 turns it off')
  add('--running_mixup', action=argparse.BooleanOptionalAction, default=False,
      help='mixup: the next batch is mixed with this batch as mixed (chainerkfac\'s'
           ' running_mixup), not as loaded')
  add('--random_erasing', type=float, default=0.0, metavar='P',
      help="chainerkfac's random erasing: with probability P per training image, a rectangle"
           ' is set to 0 (the mean of standardized images); 0 turns it off')
  add('--random_erasing_area', type=float, nargs=2, default=(0.02, 0.25), metavar=('MIN', 'MAX'),
      help="random erasing: the rectangle's area, a fraction of the image's, ~ U(MIN, MAX)")
  add('--random_erasing_aspect', type=float, default=0.3, metavar='MIN',
      help="random erasing: the rectangle's aspect ratio ~ U(MIN, 1), then its height and width"
           ' are swapped with probability 1/2')
  add('--log_every', type=int, default=50, help='steps between loss logs (host syncs)')
  add('--eval_every', type=int,
      help='steps between evaluations (default: once an epoch, floored; 0: only at the end)')
  add('--seed', type=int, default=0)
  add('--json', metavar='PATH', help='write the logged losses, accuracies and timings')
  add('--log_dir', metavar='DIR',
      help='write metrics.csv, TensorBoard events and, at the end, a PNG plot per metric')
  add('--progress', action=argparse.BooleanOptionalAction, default=True,
      help='a progress bar (images/s, loss, ETA) on stderr')
  add('--checkpoint_dir', metavar='DIR', help='save orbax checkpoints of the train state here')
  add('--checkpoint_every', type=int, default=1000,
      help='steps between checkpoints (and one at the end)')
  add('--resume', action='store_true',
      help='continue from the latest checkpoint in --checkpoint_dir, exactly where it stopped'
           ' (the same flags: the data stream is a function of the seed and the step)')
  add('--stop_at', type=int, metavar='STEP',
      help='stop after this update as if interrupted (saving a checkpoint); to test --resume')
  p.set_defaults(**task.defaults)

  def field(path: str, name: str, value: Any) -> Any:
    """A config file's value for flag `name`, checked against the flag's type and choices."""
    if name not in flags or name == 'config':
      close = difflib.get_close_matches(name, [f for f in flags if f != 'config'], 1)
      raise SystemExit(f"--config {path}: unknown field '{name}'"
                       + (f" (did you mean '{close[0]}'?)" if close else '')
                       + '; the fields are the flags, without the dashes.')
    action = flags[name]
    kind = bool if action.nargs == 0 else action.type or str
    expected = {bool: 'true or false', int: 'an integer', float: 'a number',
                str: 'a string'}[kind]

    def typed(v: Any) -> Any:  # v as the flag's type, or None
      if kind is float and type(v) is int:
        return float(v)
      return v if type(v) is kind else None  # not isinstance: true is no integer

    count = action.nargs if isinstance(action.nargs, int) else 0
    if count:
      got = [typed(v) for v in value] if isinstance(value, list) and len(value) == count else None
      if got is None or None in got:
        raise SystemExit(f"--config {path}: field '{name}' must be a list of {count} values,"
                         f' each {expected}, not {value!r}.')
      return got
    got = typed(value)
    if got is None:
      raise SystemExit(f"--config {path}: field '{name}' must be {expected}, not {value!r}.")
    if action.choices is not None and got not in action.choices:
      raise SystemExit(f"--config {path}: field '{name}' must be one of"
                       f' {", ".join(map(repr, action.choices))}, not {got!r}.')
    return got

  pre = argparse.ArgumentParser(add_help=False)  # finds --config, however abbreviated
  pre.add_argument('--config')
  path = pre.parse_known_args(argv)[0].config
  if path:
    try:
      with open(path, 'rb') as f:
        config = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
      raise SystemExit(f'--config {path}: {e}') from None
    p.set_defaults(**{name: field(path, name, value) for name, value in config.items()})
  args = p.parse_args(argv)
  for name, value in task.optimizer_defaults[args.optimizer].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def check_args(args: argparse.Namespace, task: Task, devices: int) -> None:
  """Raises SystemExit for sizes that do not split evenly and for flags out of range."""
  per_update = devices * args.acc_iters
  if args.batch_size % per_update or args.batch_size % jax.process_count():
    raise SystemExit(f'--batch_size {args.batch_size} must be divisible by devices x acc_iters'
                     f' = {per_update} and by the {jax.process_count()} processes.')
  if args.eval_batch_size % devices or args.eval_batch_size % jax.process_count():
    raise SystemExit(f'--eval_batch_size {args.eval_batch_size} must be divisible by the'
                     f' {devices} devices.')
  if args.data == 'tfds' and args.num_classes != task.classes:
    raise SystemExit(f'--num_classes: {task.tfds_name} has {task.classes} classes.')
  if args.data == 'imagelist':
    for name in ('train_list', 'train_root', 'val_list'):
      if not getattr(args, name):
        raise SystemExit(f'--data imagelist needs --{name}.')
    for name in ('train_list', 'val_list', 'mean_file'):
      path = getattr(args, name)
      if path and not os.path.isfile(path):
        raise SystemExit(f'--{name} {path}: no such file.')
    for name in ('train_root', 'val_root'):
      path = getattr(args, name)
      if path and not os.path.isdir(path):
        raise SystemExit(f'--{name} {path}: no such directory.')
  elif any(getattr(args, n) for n in ('train_list', 'train_root', 'val_list', 'val_root')):
    raise SystemExit('--train_list, --train_root, --val_list and --val_root need --data imagelist.')
  check_checkpoint_flags(args)
  if args.eval_every is not None and args.eval_every < 0:
    raise SystemExit(f'--eval_every {args.eval_every} must be >= 0 (0: only at the end).')
  if args.log_every < 1:
    raise SystemExit(f'--log_every {args.log_every} must be >= 1.')
  if args.subsample < 1:
    raise SystemExit(f'--subsample {args.subsample} must be >= 1 (1: every example).')
  if args.subsample_positions < 1:
    raise SystemExit(f'--subsample_positions {args.subsample_positions} must be >= 1'
                     ' (1: every position).')
  if args.mixup_alpha < 0:
    raise SystemExit(f'--mixup_alpha {args.mixup_alpha} must be >= 0 (0: no mixup).')
  if not 0 <= args.random_erasing <= 1:
    raise SystemExit(f'--random_erasing {args.random_erasing} must be a probability.')
  low, high = args.random_erasing_area
  if not 0 < low <= high <= 1:
    raise SystemExit(f'--random_erasing_area {low} {high}: need 0 < MIN <= MAX <= 1.')
  if not 0 < args.random_erasing_aspect <= 1:
    raise SystemExit(f'--random_erasing_aspect {args.random_erasing_aspect}: need 0 < MIN <= 1.')
  task.make_model(args)  # a model flag it rejects (an unknown --arch) fails before any data loads


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


def synthetic_batches(args: argparse.Namespace, task: Task, local_batch: int, train: bool,
                      first: int = 0) -> Iterator[Batch]:
  """This process's slices of the global batches: training cycles through `synthetic_size`
  examples forever (from global batch `first`); the test set (the next fifth) is padded to whole
  batches with weight 0."""
  data = Synthetic(args, task.channels)
  start = jax.process_index() * local_batch
  global_batch = local_batch * jax.process_count()
  if train:
    for step in range(first, 2**62):
      idx = (step * global_batch + start + np.arange(local_batch)) % data.size
      yield (*data.examples(idx), np.ones(local_batch, np.float32))
  test = data.size // 5
  for first in range(0, test, global_batch):
    idx = first + start + np.arange(local_batch)
    yield (*data.examples(data.size + np.minimum(idx, test - 1)),
           (idx < test).astype(np.float32))


def tfds_batches(args: argparse.Namespace, task: Task, local_batch: int, train: bool,
                 first: int = 0) -> Iterator[Batch]:
  """This process's batches of its share of the split (`tfds.split_for_jax_process`); the test
  split is padded with weight-0 examples so that every process runs as many batches. Training
  starts at batch `first` of a stream seeded by `--seed` (file order and shuffle buffer), so
  that a resumed run skips what it has seen; tf.data's determinism makes that exact on one host
  configuration, not guaranteed across TensorFlow versions."""
  tfds = _tfds()
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')  # leave the accelerators to JAX
  split = 'train' if train else task.test_split
  ds = tfds.load(task.tfds_name, split=tfds.split_for_jax_process(split),
                 as_supervised=True, shuffle_files=train, data_dir=args.data_dir,
                 read_config=tfds.ReadConfig(shuffle_seed=args.seed))
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
    ds = ds.batch(local_batch, drop_remainder=True).skip(first)
    return iter(tfds.as_numpy(ds.prefetch(2)))
  pad = tf.data.Dataset.from_tensors(
      (tf.zeros((size, size, task.channels)), tf.constant(0), tf.constant(0.0))).repeat()
  per_process = -(-split_size(args, task, task.test_split) // jax.process_count())
  batches = ds.concatenate(pad).batch(local_batch).take(-(-per_process // local_batch))
  return iter(tfds.as_numpy(batches))


def _data_module():
  try:
    import _data
  except ImportError as e:
    raise SystemExit(f'--data imagelist needs grain and Pillow (`pip install grain pillow`): {e}'
                     ) from None
  return _data


def image_list(args: argparse.Namespace, train: bool) -> list:
  """The `(path, label)` items of the training or evaluation list (`_data.read_image_list`)."""
  path = args.train_list if train else args.val_list
  root = args.train_root if train else args.val_root or args.train_root
  return _data_module().read_image_list(path, root, args.num_classes)


def imagelist_batches(args: argparse.Namespace, task: Task, local_batch: int, train: bool,
                      first: int = 0) -> Iterator[Batch]:
  """This process's slices of the global batches of the image lists (`examples/_data.py`:
  decoded and cropped on host threads, the seed's preprocessing); training starts at global
  batch `first` (every example is a function of the seed and its position in the stream)."""
  del task
  data = _data_module()
  mean = (data.load_mean(args.mean_file) if args.mean_file else data.CHANNEL_MEAN)
  prep = data.Preprocess(args.image_size, data.mean_image(mean, args.image_size), args.resize)
  if args.resize is not None and args.resize < args.image_size:
    raise SystemExit(f'--resize {args.resize} is smaller than --image_size {args.image_size}.')
  examples = data.examples(image_list(args, train), prep, local_batch, train=train,
                           seed=args.seed, process_index=jax.process_index(),
                           process_count=jax.process_count())
  if first:
    examples = examples[first * local_batch:]
  return iter(data.prefetched_batches(examples, local_batch, args.loader_workers, 2))


def _tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise SystemExit('--data tfds needs TensorFlow Datasets: `pip install -e ".[tfds]"`'
                     ' (tensorflow, tensorflow-datasets), or --data synthetic (no download).'
                     ) from None
  return tfds


def split_size(args: argparse.Namespace, task: Task, split: str) -> int:
  """Examples in a tfds split: the cardinality tfds gives the loaded split (from its metadata,
  and also under `tfds.testing.mock_data`, whose metadata has no splits)."""
  ds = _tfds().load(task.tfds_name, split=split, data_dir=args.data_dir)
  return int(ds.cardinality())


def train_size(args: argparse.Namespace, task: Task) -> int:
  if args.data == 'synthetic':
    return args.synthetic_size
  if args.data == 'imagelist':
    return len(image_list(args, train=True))
  return split_size(args, task, 'train')


def batches(args: argparse.Namespace, task: Task, global_batch: int, train: bool,
            first: int = 0) -> Iterator[Batch]:
  """This process's slices of the global batches, training from global batch `first`."""
  source = {'synthetic': synthetic_batches, 'tfds': tfds_batches,
            'imagelist': imagelist_batches}[args.data]
  return source(args, task, global_batch // jax.process_count(), train, first)


# --------------------------------------------------------------------------------- optimizer


def learning_rate(args: argparse.Namespace, steps: int,
                  steps_per_epoch: float) -> optax.Schedule:
  """The learning rate of update k (0-based). `steps_per_epoch`: training set size / global
  batch, fractional (chainerkfac's epochs are `epoch_detail`, updates x batch / size)."""
  if args.lr_schedule == 'cosine':
    return optax.cosine_decay_schedule(args.lr, steps)
  if args.lr_schedule == 'poly':  # chainerkfac's: constant, then lr (1 - (e - s) / (E - s))^p
    epochs = args.epochs if args.steps is None else steps / steps_per_epoch
    end = max(epochs, args.poly_end_epoch or epochs)
    if end <= args.decay_start_epoch:  # the run stops before the decay would start
      return optax.constant_schedule(args.lr)
    return recipe.polynomial_schedule(args.lr, steps_per_epoch, epochs, args.decay_start_epoch,
                                      args.poly_end_epoch, args.poly_power)
  return optax.constant_schedule(args.lr)


def make_optimizer(args: argparse.Namespace, schedule: optax.Schedule,
                   table: kfax.LayerTable | None) -> optax.GradientTransformationExtraArgs:
  """K-FAC + SGD with momentum, SGD with momentum, or AdamW; decay on kernels only;
  `--weight_norm_cap` last. `table`: the loss's layer table (`layer_table`), for K-FAC."""
  kernels = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  cap = [recipe.weight_norm_cap()] if args.weight_norm_cap else []
  if args.optimizer == 'adam':
    return optax.chain(optax.adamw(schedule, weight_decay=args.weight_decay, mask=kernels), *cap)
  decay = [optax.add_decayed_weights(args.weight_decay, kernels)] if args.weight_decay else []
  if args.momentum_correction:  # equal to chainerkfac's corrected heavy ball (recipe.py)
    sgd = optax.sgd(schedule, momentum=args.momentum)
  else:
    sgd = recipe.corrected_momentum_sgd(schedule, args.momentum, adjust_momentum=False)
  if args.optimizer == 'sgd':
    return optax.chain(*decay, sgd, *cap)
  kfac = kfax.kfac(table, damping=args.damping, ema_decay=args.ema_decay,
                   inverse_every=args.inverse_every, damping_mode=args.damping_mode,
                   norm_constraint=args.norm_constraint or None, axis_name=AXIS,
                   comm_dtype=args.comm_dtype, gather=args.gather, refresh=args.refresh)
  return optax.chain(kfac, *decay, sgd, *cap)


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
  """`loss(params, images, targets, labels, *, batch_stats) -> (mean loss, (new batch_stats,
  accuracy))`: the loss against `targets` (soft with mixup), the training accuracy against the
  integer, unmixed `labels`, as chainerkfac reports it."""

  def loss_fn(params, x, y, labels, *, batch_stats):
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return kfax.softmax_cross_entropy(logits, y), (new.get('batch_stats', {}), accuracy)

  return loss_fn


def stats_fn(model: nn.Module, args: argparse.Namespace) -> Callable:
  return kfax.value_grad_and_stats(make_loss(model), has_aux=True, fisher=args.fisher,
                                   subsample=args.subsample,
                                   subsample_positions=args.subsample_positions,
                                   stats_dtype=args.stats_dtype)


def layer_table(model: nn.Module, args: argparse.Namespace, mesh: Mesh, params: Any,
                batch_stats: Any, shape: tuple[int, ...]) -> kfax.LayerTable:
  """K-FAC's layer table: one shape-only trace of the loss as each device sees it inside the
  training step, on its share of one micro-batch. The trace runs inside `shard_map` too, where
  BatchNorm's mean over 'data' finds its axis."""
  grad_fn, tables = stats_fn(model, args), []

  def probe(params, batch_stats, x, y, labels):
    local = jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to='varying'), params)
    tables.append(grad_fn.layers(local, x, y, labels, batch_stats=batch_stats))
    return jnp.zeros(())

  micro = args.batch_size // args.acc_iters  # over all devices; the step's per-device share
  batch = NamedSharding(mesh, P(AXIS))
  labels = jax.ShapeDtypeStruct((micro,), jnp.int32, sharding=batch)
  targets = (jax.ShapeDtypeStruct((micro, args.num_classes), jnp.float32, sharding=batch)
             if args.mixup_alpha else labels)
  jax.eval_shape(jax.shard_map(probe, mesh=mesh, in_specs=(P(), P(), *[P(AXIS)] * 3),
                               out_specs=P()),
                 params, batch_stats, jax.ShapeDtypeStruct((micro, *shape), jnp.float32,
                                                           sharding=batch), targets, labels)
  return tables[0]


def init_state(tx: optax.GradientTransformation, mesh: Mesh, params: Any, batch_stats: Any,
               key: jax.Array, args: argparse.Namespace | None = None,
               shape: tuple[int, ...] = ()) -> tuple[TrainState, TrainState]:
  """The train state and its `shard_map` specs: everything is replicated, except the share of
  K-FAC's state each device keeps with `--gather gradients` (`kfax.partition_specs`) and
  mixup's carried micro-batch (`Previous`, sharded over 'data'; with `--mixup_alpha` only)."""
  shapes = jax.eval_shape(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=P(),
                                        check_vma=False), params)
  opt_specs = kfax.partition_specs(shapes, AXIS)
  opt_state = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=opt_specs))(
      params)
  previous, previous_specs = (), ()
  if args is not None and args.mixup_alpha:
    micro = args.batch_size // args.acc_iters
    previous_specs = Previous(P(AXIS), P(AXIS), P())
    previous = jax.jit(lambda: Previous(jnp.zeros((micro, *shape), jnp.float32),
                                        jnp.zeros((micro, args.num_classes), jnp.float32),
                                        jnp.zeros((), bool)),
                       out_shardings=jax.tree.map(lambda p: NamedSharding(mesh, p),
                                                  previous_specs))()
  return (TrainState(params, batch_stats, opt_state, key, previous),
          TrainState(P(), P(), opt_specs, P(), previous_specs))


def make_augment(args: argparse.Namespace) -> Callable | None:
  """chainerkfac's training-time augmentation on each device's share of the batch,
  `augment(key, images, labels, previous) -> (images, labels, previous)`: with `--mixup_alpha`,
  each micro-batch is mixed with the device's previous micro-batch (the last one of the previous
  step for the first; the very first with itself, the identity) into soft labels, then erased
  (`recipe.mixup_and_erase`, in a scan over the micro-batches); with `--random_erasing` alone,
  the images are erased and the labels stay integers. None when both are off."""
  if not (args.mixup_alpha or args.random_erasing):
    return None
  erase = {'area': tuple(args.random_erasing_area), 'aspect_min': args.random_erasing_aspect}

  def augment(key, x, y, previous):
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))  # each device draws its own
    if not args.mixup_alpha:
      return recipe.random_erasing(key, x, args.random_erasing, **erase), y, previous
    onehot = jax.nn.one_hot(y, args.num_classes, dtype=jnp.float32)
    micro = lambda a: a.reshape(args.acc_iters, a.shape[0] // args.acc_iters, *a.shape[1:])
    xs, ys = micro(x), micro(onehot)
    prev = (jnp.where(previous.started, previous.images, xs[0]),
            jnp.where(previous.started, previous.labels, ys[0]))

    def body(prev, inputs):
      k, xi, yi = inputs
      if args.random_erasing:
        xo, yo, prev = recipe.mixup_and_erase(k, xi, yi, prev, args.mixup_alpha,
                                              args.running_mixup, args.random_erasing, **erase)
      else:
        xo, yo, prev = recipe.mixup(k, xi, yi, *prev, args.mixup_alpha, args.running_mixup)
      return prev, (xo, yo)

    (images, labels), (xo, yo) = jax.lax.scan(
        body, prev, (jax.random.split(key, args.acc_iters), xs, ys))
    started = jnp.ones((), bool)
    return xo.reshape(x.shape), yo.reshape(-1, args.num_classes), Previous(images, labels, started)

  return augment


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                    specs: TrainState, args: argparse.Namespace, with_stats: bool) -> Callable:
  """`step(state, images, labels) -> (state, (mean loss, training accuracy))`, jitted over the
  mesh, state donated."""

  if with_stats:
    grad_fn = stats_fn(model, args)
  else:
    grad_fn = jax.value_and_grad(make_loss(model), has_aux=True)
  grad_fn = kfax.accumulate(grad_fn, args.acc_iters)  # a mean over micro-batches
  augment = make_augment(args)

  def step(state: TrainState, x: jax.Array,
           labels: jax.Array) -> tuple[TrainState, tuple[jax.Array, jax.Array]]:
    previous, y = state.previous, labels
    if augment is None:
      key, sample_key = jax.random.split(state.key)
    else:
      key, sample_key, augment_key = jax.random.split(state.key, 3)
      x, y, previous = augment(augment_key, x, y, previous)  # y: soft labels with mixup
    # Device-varying parameters: gradients stay local (under check_vma, gradients of replicated
    # parameters would be summed over devices inside every micro-batch) and are averaged once.
    local = jax.tree.map(lambda p: jax.lax.pcast(p, AXIS, to='varying'), state.params)
    if with_stats:
      sample_key = jax.random.fold_in(sample_key, jax.lax.axis_index(AXIS))
      (loss, (batch_stats, accuracy)), grads, stats = grad_fn(
          local, x, y, labels, rng=sample_key, batch_stats=state.batch_stats)
    else:
      (loss, (batch_stats, accuracy)), grads = grad_fn(local, x, y, labels,
                                                       batch_stats=state.batch_stats)
      stats = None
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params, stats=stats)
    params = optax.apply_updates(state.params, updates)
    return (TrainState(params, batch_stats, opt_state, key, previous),
            jax.lax.pmean((loss, accuracy), AXIS))

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
  """Prints on process 0, above the progress bar."""
  if jax.process_index() == 0:
    from tqdm.auto import tqdm

    tqdm.write(' '.join(map(str, message)))


def params_digest(params: Any) -> str:
  """A SHA-256 of the parameters' bytes (replicated: each process's first copy), to compare runs
  exactly (an interrupted and resumed run with an uninterrupted one)."""
  import hashlib

  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
  return digest.hexdigest()


def train(task: Task, args: argparse.Namespace) -> dict:
  """Trains `task`'s model; returns the logged losses, accuracies and timings."""
  from _monitor import Checkpoints, Monitor

  mesh = make_mesh(args.num_devices)
  devices = mesh.devices.size
  args.eval_batch_size = args.eval_batch_size or args.batch_size // args.acc_iters
  check_args(args, task, devices)
  checkpoints = None
  if args.checkpoint_dir:
    checkpoints = Checkpoints(args.checkpoint_dir, args.checkpoint_every)
    if args.resume and checkpoints.latest() is None:
      raise SystemExit(f'--resume: no checkpoint in --checkpoint_dir {args.checkpoint_dir}.')
    if not args.resume and checkpoints.latest() is not None:
      raise SystemExit(f'--checkpoint_dir {args.checkpoint_dir} has checkpoints (up to step'
                       f' {checkpoints.latest()}): add --resume, or use an empty folder.')
  size = train_size(args, task)  # checks that tfds is installed, reads an image list
  steps_per_epoch = size / args.batch_size  # fractional, as chainerkfac's epochs
  steps = args.steps or max(math.ceil(args.epochs * steps_per_epoch - 1e-9), 1)
  eval_every = max(int(steps_per_epoch), 1) if args.eval_every is None else args.eval_every
  schedule = learning_rate(args, steps, steps_per_epoch)
  model = task.make_model(args)
  shape = (args.image_size, args.image_size, task.channels)
  params, batch_stats, key = init_variables(model, mesh, shape, args.seed)
  table = (layer_table(model, args, mesh, params, batch_stats, shape)
           if args.optimizer == 'kfac' else None)
  tx = make_optimizer(args, schedule, table)
  state, specs = init_state(tx, mesh, params, batch_stats, key, args, shape)
  start = 0
  if args.resume:
    start, state = checkpoints.restore(state)
    if start > steps:
      raise SystemExit(f'--resume: the checkpoint is at step {start}, past the {steps} steps'
                       ' of this run.')
    log(f'resumed from step {start} of {args.checkpoint_dir}')
  train_batches = batches(args, task, args.batch_size, train=True, first=start)
  log(f'{task.name}: {type(model).__name__}, {args.optimizer}, jax {jax.__version__},'
      f' {devices} {jax.devices()[0].platform} devices in {jax.process_count()} processes,'
      f' global batch {args.batch_size} ({args.acc_iters} micro-batches), {steps} steps')

  x, y, _ = next(train_batches)
  x, y = global_array(mesh, x), global_array(mesh, y)
  begin = time.perf_counter()
  kfac = args.optimizer == 'kfac'
  compiled = {s: make_train_step(model, tx, mesh, specs, args, s).lower(state, x, y).compile()
              for s in ({True, False} if kfac and args.stats_every > 1 else {kfac})}
  eval_step = make_eval_step(model, mesh)
  compile_seconds = time.perf_counter() - begin
  log(f'compiled {len(compiled)} training steps in {compile_seconds:.1f} s')

  monitor = Monitor(args.log_dir, steps, args.batch_size, start, show=args.progress)
  history, evals = [], []
  clock = {'seconds': 0.0, 'mark': time.perf_counter()}

  def tick() -> float:
    """Training seconds so far: wall-clock time outside evaluation and checkpoints."""
    now = time.perf_counter()
    clock['seconds'] += now - clock['mark']
    clock['mark'] = now
    return clock['seconds']

  def evaluate(step: int) -> None:
    jax.block_until_ready(state)
    tick()
    evals.append({'step': step, 'accuracy': accuracy(eval_step, state, mesh, args, task)})
    monitor.log(step, test_accuracy=evals[-1]['accuracy'])
    clock['mark'] = time.perf_counter()

  done = start  # updates applied
  for i in range(start, steps):
    if i > start:
      x, y, _ = next(train_batches)
      x, y = global_array(mesh, x), global_array(mesh, y)
    state, (loss, train_accuracy) = compiled[kfac and i % args.stats_every == 0](state, x, y)
    done = i + 1
    monitor.advance()
    if i % args.log_every == 0 or done == steps:
      loss, train_accuracy = map(float, (loss, train_accuracy))  # training's only host sync
      last = history[-1] if history else {'step': start - 1, 'seconds': 0.0}
      history.append({'step': i, 'loss': loss, 'train_accuracy': train_accuracy,
                      'seconds': tick()})
      per_step = (history[-1]['seconds'] - last['seconds']) / (i - last['step'])
      lr = float(schedule(i))
      monitor.log(i, loss=loss, train_accuracy=train_accuracy, lr=lr)
      if not args.progress:
        log(f'step {i:>6}  loss {loss:.4f}  train accuracy {train_accuracy:.4f}  lr {lr:.4g}'
            f'  {1e3 * per_step:.1f} ms/step')
      if not math.isfinite(loss):
        log('loss is not finite: stopping')
        break
    stop = args.stop_at is not None and done >= args.stop_at
    if eval_every and done % eval_every == 0 and done != steps and not stop:
      evaluate(done)
      log(f'step {done:>6}  test accuracy {evals[-1]["accuracy"]:.4f}')
    if checkpoints and (done % args.checkpoint_every == 0 or done == steps or stop):
      tick()
      checkpoints.save(done, state, force=True)
      clock['mark'] = time.perf_counter()
    if stop:
      log(f'stopping after step {done} (--stop_at)')
      break
  jax.block_until_ready(state)
  train_seconds = tick()
  evaluate(done)
  monitor.close()
  if checkpoints:
    checkpoints.close()
  log(f'final test accuracy {evals[-1]["accuracy"]:.4f} after {done} steps,'
      f' {train_seconds:.1f} s of training')
  return {
      'task': task.name, 'args': vars(args), 'jax_version': jax.__version__,
      'devices': devices, 'processes': jax.process_count(), 'start_step': start, 'steps': done,
      'losses': history, 'evals': evals, 'final_accuracy': evals[-1]['accuracy'],
      'compile_seconds': compile_seconds, 'train_seconds': train_seconds,
      'seconds_per_step': train_seconds / max(done - start, 1),
      'params_digest': params_digest(state.params),
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
