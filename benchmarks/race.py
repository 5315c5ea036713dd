"""A public race: steps and seconds to a target for kfax against five other optimizers.

Contestants (each tuned on a learning-rate grid):

- `sgd`: `optax.sgd(lr, momentum=0.9)`;
- `adam`: `optax.adam(lr)`;
- `muon`: `optax.contrib.muon(lr)` (Newton-Schulz on the momentum of matrix parameters, Adam on the
  rest, both at `lr`). Two variants: `2d`, optax's default rule (every 2-D parameter is a matrix,
  so conv kernels and attention kernels get Adam while the LM's embedding and positions get
  Newton-Schulz), and `matrices`, which flattens conv kernels (HWI x O) and attention kernels
  (width x heads*dim) into matrices and leaves embeddings, positions and biases to Adam, as
  Muon's authors do. `matrices` runs only where it differs from `2d` (cnn, lm, resnet);
- `shampoo`: distributed Shampoo (`precondition.distributed_shampoo`, PyPI `precondition-opt`),
  block size 128, RMSprop-normalized grafting, beta1 0.9, beta2 0.999, Nesterov, statistics
  every step, inverse p-th roots (its default coupled Newton iteration) every 10 steps, or 50 in
  the second stage; preconditioning from step 5 (its default);
- `psgd`: PSGD-Kron (`psgd_jax.kron.kron`, PyPI `psgd-jax`) with its defaults (momentum 0.9,
  preconditioner updated every step for the first 500 steps);
- `kfax`: `optax.chain(kfax.kfac(table, damping=d, inverse_every=i), optax.sgd(lr, momentum=0.9))`
  (factored damping, norm constraint 1e-3, EMA 0.95: kfac's defaults) with statistics (MC
  Fisher, `kfax.value_grad_and_stats(loss, fisher='mc')`, passed as `stats=`) every `s` steps and
  plain `jax.value_and_grad` steps with `stats=None` in between; d in {1e-4, 1e-3} with
  (s, i) = (5, 10), then (s, i) in {(1, 10), (10, 20)} in the second stage, then, at the best
  so far, the statistics options of `kfax.value_grad_and_stats` in the third: from every k-th
  example (`subsample=k`, k in {2, 4}), from half the positions (`subsample_positions=2`),
  rounded to bfloat16 (`stats_dtype="bfloat16"`), and the empirical Fisher (`fisher="empirical"`:
  G from the loss's own gradients, no MC backward pass);
- `kfax_qm`: `kfax.quadratic_model(kfax.kfac(table, damping=d, inverse_every=i,
  norm_constraint=None))`, with no learning rate and no momentum to tune (the quadratic model
  chooses both every step, and adapts its own damping from initial_damping 1); the same
  damping and period grid as `kfax`. Its steps also compute the Gauss-Newton products (two
  Jacobian-vector products) and, every 5 steps, the loss before and after the update.

Shampoo and PSGD are optional (`pip install -e ".[race]"`): a contestant whose package does not
import is skipped with a printed line and listed in the results. Both need small aliases for
the jax and optax installed here, applied at import time in this process (`import_shampoo`,
`import_psgd`); no installed file is changed.

Tasks (data that ships with scikit-learn or with Python; nothing is downloaded):

- `mlp`, `cnn`: the digits MLP (64-128-128-10) and CNN of `examples/digits.py`, its split
  (1437 / 360) and batch (128); target 97% test accuracy, at most 500 steps;
- `autoencoder`: a 64-256-128-32-128-256-64 tanh autoencoder (linear code layer, logits out,
  `kfax.sigmoid_binary_cross_entropy` on pixels in [0, 1]) on the digits images, batch 128, at
  most 600 steps; target: test reconstruction MSE of sigmoid(logits) <= AE_TARGET (from a pilot);
- `lm`: a byte-level causal transformer (`models.TinyLM`: learned positions, 2 pre-LayerNorm
  blocks of 4-head attention and a GELU MLP, width 64, tied `Embed.attend` output; vocabulary
  256) on the standard library's top-level `*.py` files sorted by name, the first 1.5 MB: the
  first 90% trains (random windows of 64, batch 16), the last 10% validates (128 fixed windows);
  target: validation loss <= LM_TARGET bits per char (from a pilot), at most 500 steps;
- `resnet`: the BatchNorm `models.DigitsResNet` on the digits (batch 64, at most 300 steps),
  target 97% test accuracy.

Method. The learning rate lives in the optimizer state: each optimizer is built at rate 1 and
chained with `optax.inject_hyperparams(optax.scale)(step_size=lr)`, the same update because all
of them are linear in their rate (no weight decay). So every contestant and static setting has
one step function per task (kfax two: with and without statistics), compiled ahead of time
(`jit(...).lower().compile()`, not timed) with the train state donated. The runs of a phase are
interleaved: each advances `--eval_every` steps in turn, so a change of load on this shared
machine hits all alike. A run's clock counts only its chunks of steps, each ended by one
`jax.block_until_ready`; the evaluation after each chunk is not timed. A run stops at the first
evaluation that meets the target, at a non-finite loss, at the task's step budget, or at the
time cap: once some run of the phase has reached the target in T seconds, a run whose clock is
past max(cap * T, 2 s) stops and counts as not arriving (`--grid_cap` 3, `--race_cap` 5). The
cap bounds the wall time of optimizers whose steps cost many times the leader's (Shampoo's
inverse roots on CPU); the tables say where it stopped a run.

1. Grid pass, seed 0: every learning rate of the grid with every first-stage setting; then the
   second-stage settings at each contestant's best rate, then the third stage's (kfax's
   statistics options) at the best after that; then, where a contestant's best rate is
   the lowest or highest it tried, the next rate beyond (x or / the grid ratio), up to `--extend`
   times. A contestant's best reaches the target in the fewest seconds (then steps; if none
   arrives, the best metric).
2. Race: the best configuration of each contestant on `--seeds` seeds (0, 1, 2), interleaved;
   the table gives the medians (a seed that does not arrive counts as infinite).

A seed sets the initialization, the data order and kfax's MC samples. Run (35-40 minutes on 2 CPU
cores, compilation and evaluation included, half of it the LM; writes
benchmarks/results/race.md, .json and .png):

    nice -n 5 python benchmarks/race.py
    python benchmarks/race.py --quick                    # a smoke test, writes to /tmp
    python benchmarks/race.py --tasks lm --contestants kfax,adam --seeds 1
    python benchmarks/race.py --replot benchmarks/results/race.json   # md and png again
"""

from __future__ import annotations

import os

# One OpenBLAS thread: its threads oversubscribe the cores beside XLA's pool and make CPU
# Cholesky / eigh steps 10-50x slower under load (README.md).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import warnings
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
import models  # noqa: E402  (TinyLM, DigitsResNet)
import time_to_accuracy  # noqa: E402  (the digits example, loaded by load_digits_example())

digits = time_to_accuracy.digits
ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / 'results'

# Targets, chosen after a pilot so that the best contestant arrives in a few hundred steps.
AE_TARGET = 0.005
LM_TARGET = 3.0
TARGET_NOTES = {  # the pilots (seed 0, no target, evaluation every 10 steps; kfax at lr 0.1/0.3)
    'autoencoder': 'AE_TARGET, chosen after a pilot (seed 0, 600 steps, no target): first at or'
                   ' below 0.005 were muon lr 0.01 at step 150 (lowest 0.0041 at 240, then it'
                   ' overfit), PSGD lr 1e-3 at 260, Adam lr 3e-3 at 300, SGD lr 0.03 at 400;'
                   ' kfax lr 0.1 (damping 1e-4) reached 0.0070 at best.',
    'lm': 'LM_TARGET, chosen after a pilot (seed 0, 600 steps, no target, 256 validation'
          ' windows): first at or below 3.0 bits/char were muon (matrices) lr 0.03 at step 220,'
          ' kfax lr 0.1 at 330, PSGD lr 3e-3 and muon (2d) lr 0.01 at 400, Adam lr 3e-3 at 410;'
          ' the lowest at 600 steps was 2.58.',
}

# ------------------------------------------------------------------------------ optional peers


def import_shampoo() -> Any:
  """`precondition.distributed_shampoo`, with aliases for names that newer JAX removed."""
  # precondition-opt 0.3.0 calls `jax.tree_map`, `jax.tree_flatten` and `jax.tree_unflatten`,
  # which JAX removed (0.6); alias them to their `jax.tree` successors, same signatures. Only
  # set when missing, on the jax module of this process; no installed file is changed.
  for old, new in (('tree_map', jax.tree.map), ('tree_flatten', jax.tree.flatten),
                   ('tree_unflatten', jax.tree.unflatten)):
    if not hasattr(jax, old):
      setattr(jax, old, new)
  from precondition import distributed_shampoo
  return distributed_shampoo


def import_psgd() -> Any:
  """`psgd_jax.kron`, with an alias for a module that newer optax moved."""
  # psgd-jax 0.2.9 does `from optax._src import clipping` (unused by kron), a module that optax
  # 0.2.8 moved to `optax.transforms._clipping`; alias it in sys.modules and on optax._src.
  import optax._src
  if 'optax._src.clipping' not in sys.modules:
    try:
      import optax._src.clipping  # noqa: F401
    except ImportError:
      from optax.transforms import _clipping
      sys.modules['optax._src.clipping'] = _clipping
      optax._src.clipping = _clipping
  from psgd_jax import kron
  return kron


def load_peers(names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
  """The optional peers among `names` that import, and why the others were skipped."""
  loaders = {'shampoo': (import_shampoo, 'precondition-opt'), 'psgd': (import_psgd, 'psgd-jax')}
  found, skipped = {}, {}
  for name in names:
    if name not in loaders:
      continue
    load, package = loaders[name]
    try:
      found[name] = load()
    except Exception as e:  # noqa: BLE001  (any import failure skips the contestant)
      skipped[name] = f'{package} not importable ({type(e).__name__}: {e})'
      print(f'skipping {name}: {skipped[name]}; pip install -e ".[race]"', flush=True)
  return found, skipped


# ------------------------------------------------------------------------------------- tasks


@dataclasses.dataclass
class Task:
  """A model, its loss, data and metric. `loss(params, rest, *batch) -> (mean loss, rest)`;
  `rest` holds other variable collections (BatchNorm's `batch_stats`), else {}."""

  name: str
  description: str
  metric: str  # what `evaluate` returns
  higher_is_better: bool
  target: float
  max_steps: int
  batch_size: int
  init: Callable[[int], tuple[Any, Any]]  # seed -> (params, rest)
  loss: Callable[..., tuple[jax.Array, Any]]
  evaluate: Callable[..., jax.Array]  # (params, rest, *test) -> scalar metric
  batches: Callable[[int, int], tuple[np.ndarray, ...]]  # (seed, steps) -> (steps, B, ...) arrays
  test: tuple[np.ndarray, ...]

  def meets(self, value: float) -> bool:
    """Whether `value` of the metric meets the target."""
    return value >= self.target if self.higher_is_better else value <= self.target


def digits_batches(data: dict, batch_size: int) -> Callable[[int, int], tuple[np.ndarray, ...]]:
  """(seed, steps) -> the digits (images, labels) of `digits.batch_indices`' plan."""
  def batches(seed: int, steps: int) -> tuple[np.ndarray, ...]:
    plan = digits.batch_indices(len(data['y_train']), steps, batch_size, seed)
    return data['x_train'][plan], data['y_train'][plan]
  return batches


def classifier_task(name: str, max_steps: int = 500) -> Task:
  """The digits MLP or CNN of `examples/digits.py`, target 97% test accuracy."""
  model, data = digits.MODELS[name](), digits.load_data()

  def init(seed):
    return model.init(jax.random.key(seed), data['x_test'][:1])['params'], {}

  def loss(params, rest, x, y):
    return kfax.softmax_cross_entropy(model.apply({'params': params}, x), y), rest

  def accuracy(params, rest, x, y):
    return jnp.mean(jnp.argmax(model.apply({'params': params}, x), -1) == y)

  return Task(name, f'digits {name.upper()} of examples/digits.py', 'test accuracy', True, 0.97,
              max_steps, digits.BATCH_SIZE, init, loss, accuracy,
              digits_batches(data, digits.BATCH_SIZE), (data['x_test'], data['y_test']))


class Autoencoder(nn.Module):
  """64-256-128-32-128-256-64: tanh hidden layers, a linear code, logits out."""

  widths: tuple[int, ...] = (256, 128, 32, 128, 256)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.reshape((x.shape[0], -1))
    code = len(self.widths) // 2
    for i, w in enumerate(self.widths):
      h = nn.Dense(w)(h)
      h = h if i == code else nn.tanh(h)
    return nn.Dense(x.shape[-3] * x.shape[-2] * x.shape[-1])(h)


def autoencoder_task(max_steps: int = 600) -> Task:
  """Reconstruct the digits images (pixels in [0, 1]); metric: test MSE of sigmoid(logits)."""
  model, data = Autoencoder(), digits.load_data()
  flat = lambda x: x.reshape((x.shape[0], -1))

  def init(seed):
    return model.init(jax.random.key(seed), data['x_test'][:1])['params'], {}

  def loss(params, rest, x, y):
    del y
    return kfax.sigmoid_binary_cross_entropy(model.apply({'params': params}, x), flat(x)), rest

  def mse(params, rest, x, y):
    del rest, y
    return jnp.mean((jax.nn.sigmoid(model.apply({'params': params}, x)) - flat(x)) ** 2)

  return Task('autoencoder', 'digits autoencoder 64-256-128-32-128-256-64 (tanh, sigmoid BCE)',
              'test MSE', False, AE_TARGET, max_steps, digits.BATCH_SIZE, init, loss, mse,
              digits_batches(data, digits.BATCH_SIZE), (data['x_test'], data['y_test']))


LM_CONTEXT, LM_BYTES = 64, 1_500_000


def stdlib_bytes(limit: int = LM_BYTES) -> np.ndarray:
  """The first `limit` bytes of the standard library's top-level *.py files, sorted by name."""
  out = bytearray()
  for path in sorted(Path(os.path.dirname(os.__file__)).glob('*.py')):
    out += path.read_bytes()
    if len(out) >= limit:
      break
  return np.frombuffer(bytes(out[:limit]), np.uint8)


def windows(text: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, next bytes), each (len(starts), LM_CONTEXT) int32."""
  idx = starts[:, None] + np.arange(LM_CONTEXT + 1)
  seq = text[idx].astype(np.int32)
  return seq[:, :-1], seq[:, 1:]


def lm_task(max_steps: int = 500, batch_size: int = 16, width: int = 64) -> Task:
  """Character (byte) level LM on stdlib sources; metric: validation loss in bits per char."""
  text = stdlib_bytes()
  split = int(0.9 * len(text))
  train, valid = text[:split], text[split:]
  test = windows(valid, np.linspace(0, len(valid) - LM_CONTEXT - 1, 128).astype(np.int64))
  model = models.TinyLM(vocab=256, length=LM_CONTEXT, width=width, depth=2, heads=4)

  def init(seed):
    return model.init(jax.random.key(seed), test[0][:1])['params'], {}

  def loss(params, rest, tokens, targets):
    return kfax.softmax_cross_entropy(model.apply({'params': params}, tokens), targets), rest

  def bits(params, rest, tokens, targets):
    del rest
    logits = model.apply({'params': params}, tokens)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets)) / math.log(2)

  def batches(seed, steps):
    starts = np.random.default_rng(2000 + seed).integers(
        0, len(train) - LM_CONTEXT - 1, steps * batch_size)
    x, y = windows(train, starts)
    return (x.reshape(steps, batch_size, LM_CONTEXT), y.reshape(steps, batch_size, LM_CONTEXT))

  return Task('lm', f'byte-level causal transformer LM (width {width}, 2 layers, 4 heads, tied'
              f' embedding), context {LM_CONTEXT}, stdlib sources', 'valid bits/char', False,
              LM_TARGET, max_steps, batch_size, init, loss, bits, batches, test)


def resnet_task(max_steps: int = 300, batch_size: int = 64) -> Task:
  """`models.DigitsResNet` (BatchNorm, `batch_stats` mutable in training, running averages in
  evaluation) on the digits split of `examples/digits.py`, target 97% test accuracy."""
  model, data = models.DigitsResNet(), digits.load_data()

  def init(seed):
    variables = model.init(jax.random.key(seed), data['x_test'][:1], False)
    return variables['params'], {'batch_stats': variables['batch_stats']}

  def loss(params, rest, x, y):
    logits, new = model.apply({'params': params, **rest}, x, True, mutable=['batch_stats'])
    return kfax.softmax_cross_entropy(logits, y), new

  def accuracy(params, rest, x, y):
    return jnp.mean(jnp.argmax(model.apply({'params': params, **rest}, x, False), -1) == y)

  return Task('resnet', 'BatchNorm ResNet (7 convs) on digits 8x8', 'test accuracy', True, 0.97,
              max_steps, batch_size, init, loss, accuracy, digits_batches(data, batch_size),
              (data['x_test'], data['y_test']))


TASKS: dict[str, Callable[..., Task]] = {
    'mlp': lambda **k: classifier_task('mlp', **k),
    'cnn': lambda **k: classifier_task('cnn', **k),
    'autoencoder': autoencoder_task, 'lm': lm_task, 'resnet': resnet_task}

# ------------------------------------------------------------------------------- contestants

Options = tuple[tuple[str, Any], ...]  # a contestant's static settings, hashable


@dataclasses.dataclass(frozen=True)
class Config:
  contestant: str
  lr: float
  options: Options = ()

  def label(self) -> str:
    """e.g. 'kfax lr 0.1, damping 0.0001, stats_every 5, inverse_every 10'."""
    extra = ''.join(f', {k} {v:g}' if isinstance(v, float) else f', {k} {v}'
                    for k, v in self.options)
    return f'{self.contestant} lr {self.lr:g}{extra}'

  def option(self, key: str, default: Any = None) -> Any:
    """One static setting."""
    return dict(self.options).get(key, default)


LR_GRIDS = {'sgd': (0.03, 0.1, 0.3), 'adam': (1e-3, 3e-3, 1e-2), 'muon': (1e-2, 3e-2, 0.1),
            'shampoo': (1e-4, 3e-4, 1e-3), 'psgd': (1e-3, 3e-3, 1e-2), 'kfax': (0.03, 0.1, 0.3),
            'kfax_qm': (1.0,)}  # no rate: the quadratic model chooses it
QUICK_LR_GRIDS = {'sgd': (0.3,), 'adam': (1e-2,), 'muon': (3e-2,), 'shampoo': (3e-4,),
                  'psgd': (3e-3,), 'kfax': (0.1,), 'kfax_qm': (1.0,)}
CONTESTANTS = tuple(LR_GRIDS)
KFAX = ('kfax', 'kfax_qm')  # the contestants with statistics steps
KFAX_DAMPINGS = (1e-4, 1e-3)
# (statistics every s steps, refresh every i updates): the first with the whole grid, the others
# at the best learning rate and damping of the first (second stage).
KFAX_PERIODS = ((5, 10), (1, 10), (10, 20))
KFAX_STATS_OPTIONS = (('subsample', 2), ('subsample', 4), ('positions', 2),
                      ('stats_dtype', 'bfloat16'),
                      ('fisher', 'empirical'))  # value_grad_and_stats; third stage
CAP_FLOOR_S = 2.0  # no run stops at the time cap before its clock reaches this
SHAMPOO_ROOTS_EVERY = (10, 50)  # Shampoo's preconditioning_compute_steps, as KFAX_PERIODS


def muon_matrices(params: Any) -> Any:
  """Muon's dimension numbers with conv and attention kernels as matrices; embeddings, positions
  and vectors to Adam (None)."""
  dims = optax.contrib.MuonDimensionNumbers

  def rule(path, x):
    name = jax.tree_util.keystr(path)
    if x.ndim < 2 or 'embedding' in name or "'pos'" in name or "'bias'" in name:
      return None
    if x.ndim == 4:  # conv HWIO
      return dims((0, 1, 2), (3,))
    if x.ndim == 3:  # DenseGeneral: (width, heads, dim) in, (heads, dim, width) out
      return dims((0, 1), (2,)) if "'out'" in name else dims((0,), (1, 2))
    return dims(0, 1)

  return jax.tree_util.tree_map_with_path(rule, params)


def muon_variants(params: Any) -> list[Options]:
  """`2d` always; `matrices` where it assigns any parameter differently from the 2-D rule."""
  matrices = jax.tree.leaves(muon_matrices(params), is_leaf=lambda x: x is None or isinstance(
      x, optax.contrib.MuonDimensionNumbers))
  default = [x.ndim == 2 for x in jax.tree.leaves(params)]
  plain = optax.contrib.MuonDimensionNumbers()
  differs = any((m is not None) != d or (m is not None and m != plain)
                for m, d in zip(matrices, default))
  return [(('dims', '2d'),)] + ([(('dims', 'matrices'),)] if differs else [])


def variants(contestant: str, params: Any, quick: bool) -> list[Options]:
  """The static settings each learning rate of the grid is tried with."""
  if contestant == 'muon':
    return muon_variants(params)[:1 if quick else None]
  if contestant == 'shampoo':
    return [(('roots_every', SHAMPOO_ROOTS_EVERY[0]),)]
  if contestant in KFAX:
    (s, i), dampings = KFAX_PERIODS[0], KFAX_DAMPINGS[:1 if quick else None]
    return [(('damping', d), ('stats_every', s), ('inverse_every', i)) for d in dampings]
  return [()]


def second_stage(best: Config) -> list[Config]:
  """The other periods, tried at the learning rate and damping of a contestant's best."""
  merge = lambda **o: dataclasses.replace(best, options=tuple({**dict(best.options), **o}.items()))
  if best.contestant in KFAX:
    return [merge(stats_every=s, inverse_every=i) for s, i in KFAX_PERIODS[1:]]
  if best.contestant == 'shampoo':
    return [merge(roots_every=n) for n in SHAMPOO_ROOTS_EVERY[1:]]
  return []


def third_stage(best: Config) -> list[Config]:
  """kfax's statistics options, one at a time, at the best config after the periods."""
  if best.contestant not in KFAX:
    return []
  return [dataclasses.replace(best, options=best.options + (option,))
          for option in KFAX_STATS_OPTIONS]


def unit_transform(config: Config, table: kfax.LayerTable,
                   peers: dict[str, Any]) -> optax.GradientTransformation:
  """The contestant's optimizer at learning rate 1 (the rate is applied after it, in the state)."""
  name = config.contestant
  if name == 'sgd':
    return optax.sgd(1.0, momentum=0.9)
  if name == 'adam':
    return optax.adam(1.0)
  if name == 'muon':
    dims = muon_matrices if config.option('dims') == 'matrices' else None
    return optax.contrib.muon(1.0, muon_weight_dimension_numbers=dims)
  if name == 'shampoo':
    ds = peers['shampoo']
    return ds.distributed_shampoo(
        1.0, block_size=128, beta1=0.9, beta2=0.999, graft_type=ds.GraftingType.RMSPROP_NORMALIZED,
        nesterov=True, preconditioning_compute_steps=config.option('roots_every'),
        statistics_compute_steps=1,
        generate_training_metrics=False)
  if name == 'psgd':
    return peers['psgd'].kron(1.0)
  if name == 'kfax':
    return optax.chain(kfax.kfac(table, damping=config.option('damping'),
                                 inverse_every=config.option('inverse_every')),
                       optax.sgd(1.0, momentum=0.9))
  if name == 'kfax_qm':
    return kfax.quadratic_model(kfax.kfac(table, damping=config.option('damping'),
                                          inverse_every=config.option('inverse_every'),
                                          norm_constraint=None))
  raise ValueError(name)


def transform(config: Config, table: kfax.LayerTable,
              peers: dict[str, Any]) -> optax.GradientTransformation:
  """`unit_transform`, then multiplication by the learning rate, which lives in the state."""
  return optax.chain(unit_transform(config, table, peers),
                     optax.inject_hyperparams(optax.scale)(step_size=config.lr))


def init_state(tx: optax.GradientTransformation, params: Any) -> Any:
  """`tx.init(params)`, PSGD's size report silenced."""
  with contextlib.redirect_stdout(io.StringIO()):
    return tx.init(params)


# ------------------------------------------------------------------------------ step functions


@dataclasses.dataclass
class Steps:
  """AOT-compiled steps of one contestant and static setting on one task."""

  plain: Any  # (params, rest, opt_state, *batch) -> (params, rest, opt_state, loss)
  stats: Any  # kfax: (params, rest, opt_state, key, i, *batch) -> same; else None
  compile_s: float


def compile_steps(task: Task, config: Config, table: kfax.LayerTable,
                  peers: dict[str, Any]) -> Steps:
  """Compiles the plain step (and for kfax the statistics step) of `config`'s family."""
  begin = time.perf_counter()
  tx = transform(config, table, peers)
  is_kfax = config.contestant in KFAX
  grad_fn = kfax.value_grad_and_stats(task.loss, has_aux=True,
                                      fisher=config.option('fisher', 'mc'),
                                      subsample=config.option('subsample', 1),
                                      subsample_positions=config.option('positions', 1),
                                      stats_dtype=config.option('stats_dtype'))

  def extra(params, rest, batch):  # the quadratic model's products and loss of this batch
    if config.contestant != 'kfax_qm':
      return {}
    return {'gauss_newton': grad_fn.gauss_newton(params, rest, *batch),
            'loss': lambda p: task.loss(p, rest, *batch)}

  def plain(params, rest, opt_state, *batch):
    (loss, new_rest), grads = jax.value_and_grad(task.loss, has_aux=True)(params, rest, *batch)
    updates, opt_state = tx.update(grads, opt_state, params, **({'stats': None} if is_kfax else {}),
                                   **extra(params, rest, batch))
    return optax.apply_updates(params, updates), new_rest, opt_state, loss

  def with_stats(params, rest, opt_state, key, i, *batch):
    (loss, new_rest), grads, stats = grad_fn(params, rest, *batch,
                                             rng=jax.random.fold_in(key, i))
    updates, opt_state = tx.update(grads, opt_state, params, stats=stats,
                                   **extra(params, rest, batch))
    return optax.apply_updates(params, updates), new_rest, opt_state, loss

  params, rest = task.init(0)
  state = init_state(tx, params)
  batch = tuple(a[0] for a in task.batches(0, 1))
  donate = dict(donate_argnums=(0, 1, 2))
  compiled_plain = jax.jit(plain, **donate).lower(params, rest, state, *batch).compile()
  compiled_stats = None
  if is_kfax:
    compiled_stats = jax.jit(with_stats, **donate).lower(
        params, rest, state, jax.random.key(0), np.int32(0), *batch).compile()
  return Steps(compiled_plain, compiled_stats, time.perf_counter() - begin)


# ---------------------------------------------------------------------------------- training


@dataclasses.dataclass
class Run:
  """One (configuration, seed) run, advanced chunk by chunk."""

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
  history: list = dataclasses.field(default_factory=list)  # (step, seconds, metric, loss)
  stop: str | None = None  # 'target', 'budget' or 'non-finite loss'


class Arena:
  """A task's compiled steps, data and evaluation, shared by its runs."""

  def __init__(self, task: Task, peers: dict[str, Any]):
    self.task, self.peers = task, peers
    params, rest = task.init(0)
    grad_fn = kfax.value_grad_and_stats(task.loss, has_aux=True)
    self.table = grad_fn.layers(params, rest, *(a[0] for a in task.batches(0, 1)))
    self.params0 = params
    self.evaluate = jax.jit(task.evaluate).lower(params, rest, *task.test).compile()
    self.compiled: dict[tuple[str, Options], Steps] = {}
    self.data: dict[int, tuple[np.ndarray, ...]] = {}

  def steps(self, config: Config) -> Steps:
    """`config`'s compiled steps, compiled on first use."""
    # One compiled pair per static setting; the statistics period is chosen in Python.
    family = (config.contestant, tuple(o for o in config.options if o[0] != 'stats_every'))
    if family not in self.compiled:
      self.compiled[family] = compile_steps(self.task, config, self.table, self.peers)
    return self.compiled[family]

  def start(self, config: Config, seed: int) -> Run:
    """A fresh run: initial parameters and optimizer state of `seed`, its data order."""
    if seed not in self.data:
      self.data[seed] = self.task.batches(seed, self.task.max_steps)
    params, rest = self.task.init(seed)
    opt_state = init_state(transform(config, self.table, self.peers), params)
    fresh = jax.tree.map(jnp.copy, (params, rest, opt_state))  # a buffer per leaf, for donation
    return Run(config, seed, self.steps(config), self.data[seed], *fresh,
               key=jax.random.key(10_000 + seed))


def take_step(run: Run, i: int) -> tuple[jax.Array, bool]:
  """Step `i` of `run` on its batch `i`, in place (not waited for): a statistics step where the
  config's `stats_every` says so. Returns the step's loss and whether it had statistics."""
  batch = tuple(a[i] for a in run.data)
  stats = run.steps.stats is not None and i % run.config.option('stats_every') == 0
  if stats:
    out = run.steps.stats(run.params, run.rest, run.opt_state, run.key, np.int32(i), *batch)
  else:
    out = run.steps.plain(run.params, run.rest, run.opt_state, *batch)
  run.params, run.rest, run.opt_state, loss = out
  return loss, stats


def advance(run: Run, arena: Arena, n: int) -> None:
  """`n` timed steps (the clock stopped by one block_until_ready), then an untimed evaluation."""
  task = arena.task
  n = min(n, task.max_steps - run.step)
  loss = None
  begin = time.perf_counter()
  for i in range(run.step, run.step + n):
    loss, _ = take_step(run, i)
  jax.block_until_ready((run.params, run.rest, run.opt_state, loss))
  run.seconds += time.perf_counter() - begin
  run.step += n
  metric, loss = float(arena.evaluate(run.params, run.rest, *task.test)), float(loss)
  run.history.append((run.step, run.seconds, metric, loss))
  if not (math.isfinite(loss) and math.isfinite(metric)):
    run.stop = 'non-finite loss'
  elif task.meets(metric):
    run.stop = 'target'
  elif run.step >= task.max_steps:
    run.stop = 'budget'


def interleave(runs: list[Run], arena: Arena, eval_every: int, cap: float,
               leader: float | None = None) -> None:
  """Advances every unfinished run by `eval_every` steps in turn until all have stopped.

  Time cap: once some run has reached the target, a run whose clock is past `cap` times the
  fewest seconds any run needed (and past CAP_FLOOR_S) stops ('time cap', counted as not
  reaching the target). `leader`: the fewest seconds of earlier runs.
  """
  while any(r.stop is None for r in runs):
    for r in runs:
      if r.stop is None:
        advance(r, arena, eval_every)
    arrived = [r.seconds for r in runs if r.stop == 'target'] + ([leader] if leader else [])
    if not arrived:
      continue
    seconds = min(arrived)
    for r in runs:
      if r.stop is None and r.seconds > max(cap * seconds, CAP_FLOOR_S):
        r.stop = 'time cap'


def kfac_counters(opt_state: Any) -> dict[str, int] | None:
  """kfax's skipped statistics and failed refreshes in `opt_state`, None without kfax."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, kfax.KfacState))
            if isinstance(s, kfax.KfacState)]
  if not states:
    return None
  return {'skipped_stats': int(states[0].skipped_stats),
          'failed_refreshes': int(states[0].failed_refreshes)}


def summarize(run: Run, task: Task) -> dict[str, Any]:
  """A finished run as plain data."""
  reached = run.stop == 'target'
  metrics = [h[2] for h in run.history]
  best = (max if task.higher_is_better else min)(metrics) if metrics else math.nan
  return {'seed': run.seed, 'stop': run.stop,
          'steps_to_target': run.step if reached else math.inf,
          'seconds_to_target': run.seconds if reached else math.inf,
          'steps_run': run.step, 'seconds_run': run.seconds,
          'ms_per_step': 1e3 * run.seconds / max(run.step, 1),
          'final_metric': run.history[-1][2], 'best_metric': best,
          'kfax_counters': kfac_counters(run.opt_state), 'history': run.history}


def row(config: Config, runs: list[dict], task: Task) -> dict[str, Any]:
  """Medians over the seeds of one configuration."""
  median = lambda k: statistics.median(r[k] for r in runs)
  return {'contestant': config.contestant, 'lr': config.lr, 'options': dict(config.options),
          'label': config.label(), 'seeds': [r['seed'] for r in runs],
          'steps': [r['steps_to_target'] for r in runs],
          'seconds': [r['seconds_to_target'] for r in runs],
          'median_steps': median('steps_to_target'), 'median_seconds': median('seconds_to_target'),
          'median_ms_per_step': median('ms_per_step'),
          'median_final_metric': median('final_metric'),
          'median_best_metric': median('best_metric'),
          'reached': sum(r['stop'] == 'target' for r in runs),
          'stops': [r['stop'] for r in runs], 'runs': runs}


def rank_key(r: dict[str, Any], task: Task) -> tuple[float, float, float]:
  """Fewest median seconds to the target, then fewest steps, then the best metric."""
  sign = -1 if task.higher_is_better else 1
  metric = sign * r['median_best_metric']
  return r['median_seconds'], r['median_steps'], metric if math.isfinite(metric) else math.inf


# ------------------------------------------------------------------------------------ phases


def run_configs(arena: Arena, configs: list[Config], seeds: list[int], eval_every: int,
                cap: float, earlier: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
  """Every configuration on every seed, interleaved; one row per configuration. The time cap
  also counts the rows of `earlier` runs."""
  runs = [arena.start(c, s) for s in seeds for c in configs]
  reached = [r for r in earlier if math.isfinite(r['median_seconds'])]
  leader = min((r['median_seconds'] for r in reached), default=None)
  interleave(runs, arena, eval_every, cap, leader)
  rows = [row(c, [summarize(r, arena.task) for r in runs if r.config == c], arena.task)
          for c in configs]
  for r in rows:
    print(f'    {arena.task.name} {r["label"]}: steps {fmt_list(r["steps"], ".0f")}, seconds'
          f' {fmt_list(r["seconds"], ".3f")}, {arena.task.metric}'
          f' {r["median_final_metric"]:.4f} ({", ".join(r["stops"])})', flush=True)
  return rows


def extension(best: Config, tried: list[Config]) -> Config | None:
  """The next learning rate beyond the edge of the rates tried where `best` sits, else None."""
  lrs = sorted({c.lr for c in tried if c.contestant == best.contestant})
  if len(lrs) < 2 or lrs[0] < best.lr < lrs[-1]:
    return None
  grid = LR_GRIDS[best.contestant]
  ratio = grid[1] / grid[0]
  lr = best.lr * ratio if best.lr == lrs[-1] else best.lr / ratio
  return dataclasses.replace(best, lr=float(f'{lr:.3g}'))


def best_rows(rows: list[dict[str, Any]], task: Task) -> dict[str, dict[str, Any]]:
  """The best row of each contestant."""
  out = {}
  for r in rows:
    if r['contestant'] not in out or rank_key(r, task) < rank_key(out[r['contestant']], task):
      out[r['contestant']] = r
  return out


def to_config(r: dict[str, Any]) -> Config:
  """The configuration of a table row."""
  return Config(r['contestant'], r['lr'], tuple(r['options'].items()))


def grid_pass(arena: Arena, configs: list[Config], args: argparse.Namespace) -> list[dict]:
  """Seed 0 on the grid, then the second stage's periods and the third stage's statistics at
  each contestant's best, then up to `--extend` rounds of rates beyond a best config's edge."""
  rows = run_configs(arena, configs, [0], args.eval_every, args.grid_cap)
  stages = () if args.quick else (('second', second_stage), ('third', third_stage))
  for name, stage in stages:
    more = [c for b in best_rows(rows, arena.task).values() for c in stage(to_config(b))]
    if more:
      print(f'  {arena.task.name}: {name} stage: ' + ', '.join(c.label() for c in more),
            flush=True)
      rows += run_configs(arena, more, [0], args.eval_every, args.grid_cap, rows)
  for _ in range(args.extend):
    tried = [to_config(r) for r in rows]
    new = [e for b in best_rows(rows, arena.task).values()
           if (e := extension(to_config(b), tried)) is not None and e not in tried]
    if not new:
      break
    print(f'  {arena.task.name}: best at a grid edge, extending: '
          + ', '.join(c.label() for c in new), flush=True)
    rows += run_configs(arena, new, [0], args.eval_every, args.grid_cap, rows)
  return rows


def run_task(task: Task, contestants: list[str], peers: dict[str, Any],
             args: argparse.Namespace) -> dict[str, Any]:
  """The grid pass and the race of every contestant on `task`."""
  arena = Arena(task, peers)
  grids = QUICK_LR_GRIDS if args.quick else LR_GRIDS
  configs = [Config(c, lr, o) for c in contestants for o in variants(c, arena.params0, args.quick)
             for lr in grids[c]]
  print(f'  {task.name}: grid of {len(configs)} configurations, seed 0', flush=True)
  grid = grid_pass(arena, configs, args)
  best = [to_config(r) for r in best_rows(grid, task).values()]
  print(f'  {task.name}: race of the best configurations on seeds {list(range(args.seeds))}',
        flush=True)
  race = run_configs(arena, best, list(range(args.seeds)), args.eval_every, args.race_cap)
  compile_s = {f'{c} {dict(o)}': s.compile_s for (c, o), s in arena.compiled.items()}
  return {'description': task.description, 'metric': task.metric,
          'higher_is_better': task.higher_is_better, 'target': task.target,
          'max_steps': task.max_steps, 'batch_size': task.batch_size,
          'eval_every': args.eval_every, 'compile_s': compile_s, 'grid': grid,
          'race': sorted(race, key=lambda r: rank_key(r, task))}


# ------------------------------------------------------------------------------------ output


def fmt(value: float, spec: str) -> str:
  """`value` formatted, or '-' when not finite (target not reached)."""
  return '-' if not math.isfinite(value) else format(value, spec)


def fmt_list(values: list[float], spec: str) -> str:
  """`fmt` of each value, in brackets."""
  return '[' + ', '.join(fmt(v, spec) for v in values) + ']'


def peer_ratio(r: dict[str, Any], rows: list[dict[str, Any]]) -> float:
  """`r`'s median seconds over the fastest other contestant's (inf if either never arrived);
  the kfax variants are not each other's peers."""
  others = [o['median_seconds'] for o in rows
            if o is not r and not (r['contestant'] in KFAX and o['contestant'] in KFAX)]
  best = min(others, default=math.inf)
  if not (math.isfinite(r['median_seconds']) and math.isfinite(best)):
    return math.inf
  return r['median_seconds'] / best


def race_table(name: str, result: dict[str, Any], seeds: int) -> list[str]:
  """The markdown table of one task's race."""
  metric = result['metric']
  goal = '>=' if result['higher_is_better'] else '<='
  lines = [f'### {name}: {result["description"]}', '',
           f'Target: {metric} {goal} {result["target"]:g}; batch {result["batch_size"]}, at most'
           f' {result["max_steps"]} steps, evaluation every {result["eval_every"]} steps; medians'
           f' of {seeds} seed(s).' + (f' Target: {TARGET_NOTES[name]}' if name in TARGET_NOTES
                                      else ''), '',
           '| contestant | best config | steps to target | seconds to target | per seed (s) |'
           f' ms/step | x best peer | final {metric} | reached |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in result['race']:
    lines.append(
        f'| {r["contestant"]} | {r["label"]} | {fmt(r["median_steps"], ".0f")} |'
        f' {fmt(r["median_seconds"], ".3f")} | {fmt_list(r["seconds"], ".3f")} |'
        f' {r["median_ms_per_step"]:.2f} | {fmt(peer_ratio(r, result["race"]), ".2f")} |'
        f' {r["median_final_metric"]:.4f} | {reached_cell(r)} |')
  return lines + ['', verdict(name, result)]


def reached_cell(r: dict[str, Any]) -> str:
  """'2/3 (time cap)': seeds that arrived, and why the others stopped."""
  others = sorted({s for s in r['stops'] if s != 'target'})
  return f'{r["reached"]}/{len(r["seeds"])}' + (f' ({", ".join(others)})' if others else '')


def verdict(name: str, result: dict[str, Any]) -> str:
  """One plain sentence: who won, and where kfax stands."""
  rows = result['race']
  winner = rows[0]
  k = next((r for r in rows if r['contestant'] in KFAX), None)  # the faster kfax variant
  if not math.isfinite(winner['median_seconds']):
    return f'**{name}: no contestant reached the target in the median.**'
  text = (f'**{name}: fastest is {winner["contestant"]}** ({fmt(winner["median_seconds"], ".3f")}'
          f' s, {fmt(winner["median_steps"], ".0f")} steps).')
  if k is None or k is winner:
    peer = next((r for r in rows if r['contestant'] not in KFAX), None)
    if k is not None and peer is not None:
      text += (f' kfax is fastest, {fmt(peer_ratio(k, rows), ".2f")}x the seconds of the'
               f' fastest peer ({peer["contestant"]}).')
    return text
  fewest = min(r['median_steps'] for r in rows)
  who = ', '.join(r['contestant'] for r in rows if r['median_steps'] == fewest)
  return text + (f' **kfax is not the fastest here**: {k["contestant"]}'
                 f' {fmt(k["median_seconds"], ".3f")} s and'
                 f' {fmt(k["median_steps"], ".0f")} steps, {fmt(peer_ratio(k, rows), ".2f")}x'
                 f' the seconds of {winner["contestant"]}; fewest steps: {who}'
                 f' ({fmt(fewest, ".0f")}).')


def grid_table(name: str, result: dict[str, Any]) -> list[str]:
  """The markdown table of one task's grid pass (seed 0)."""
  lines = [f'#### {name}, grid pass (seed 0)', '',
           f'| config | steps to target | seconds to target | ms/step | final {result["metric"]} |'
           ' stop |', '|---|---|---|---|---|---|']
  for r in result['grid']:
    lines.append(f'| {r["label"]} | {fmt(r["median_steps"], ".0f")} |'
                 f' {fmt(r["median_seconds"], ".3f")} | {r["median_ms_per_step"]:.2f} |'
                 f' {r["median_final_metric"]:.4f} | {r["stops"][0]} |')
  return lines


def cpu_model() -> str:
  """`lscpu`'s model name."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    return next(l.split(':', 1)[1].strip() for l in out.splitlines() if l.startswith('Model name'))
  except (OSError, StopIteration):
    return platform.processor() or 'unknown'


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


def environment() -> dict[str, Any]:
  """Date, versions, machine and load, and which kfax and LM text ran."""
  return {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'jax': jax.__version__, 'optax': optax.__version__, 'kfax': kfax.__version__,
          'python': platform.python_version(), 'cpu': cpu_model(), 'cpu_count': os.cpu_count(),
          'device_kind': jax.devices()[0].device_kind, 'load_average_start': os.getloadavg()[0],
          'kfax_source': kfax_source(),
          'lm_text_sha256_12': hashlib.sha256(stdlib_bytes().tobytes()).hexdigest()[:12]}


def peer_versions(peers: dict[str, Any]) -> dict[str, str]:
  """Installed versions of the optional peers that ran."""
  from importlib import metadata
  packages = {'shampoo': 'precondition-opt', 'psgd': 'psgd-jax'}
  return {packages[p]: metadata.version(packages[p]) for p in peers}


CONTESTANT_NOTES = [
    '- sgd: `optax.sgd(lr, momentum=0.9)`; adam: `optax.adam(lr)`.',
    '- muon: `optax.contrib.muon(lr)`; `dims 2d` is optax\'s default rule (Newton-Schulz on every'
    ' 2-D parameter, Adam on the rest, so conv and attention kernels get Adam), `dims matrices`'
    ' flattens conv kernels (HWI x O) and attention kernels into matrices and leaves embeddings,'
    ' positions and biases to Adam.',
    '- shampoo: `distributed_shampoo(lr, block_size=128, beta1=0.9, beta2=0.999,'
    ' graft_type=RMSPROP_NORMALIZED, nesterov=True, preconditioning_compute_steps=roots_every)`.',
    '- psgd: `psgd_jax.kron.kron(lr)`, its defaults.',
    '- kfax: `optax.chain(kfax.kfac(table, damping=d, inverse_every=i), optax.sgd(lr,'
    ' momentum=0.9))` (factored damping, norm constraint 1e-3), MC-Fisher statistics every'
    ' `stats_every` steps (from every `subsample`-th example, from about half the positions'
    ' (`positions 2`), rounded to bfloat16 (`stats_dtype`) or the empirical Fisher (`fisher'
    ' empirical`) where the config says so).',
    '- kfax_qm: `kfax.quadratic_model(kfax.kfac(table, damping=d, inverse_every=i,'
    ' norm_constraint=None))`: learning rate and momentum from the quadratic model with exact'
    ' Gauss-Newton products, its damping adapted by the Levenberg-Marquardt rule from 1; no'
    ' learning-rate grid (lr 1 is the model\'s own step).',
]


def header(record: dict[str, Any], command: str) -> list[str]:
  """Title, command, versions and machine."""
  env, src = record['environment'], record['environment']['kfax_source']
  lines = ['# kfax race: time to target against SGD, Adam, Muon, Shampoo and PSGD-Kron', '',
           f'`{command}`, {env["date"]}, {env["wall_s"] / 60:.1f} min in all; jax {env["jax"]},'
           f' optax {env["optax"]}, kfax {env["kfax"]} (commit {src.get("commit")}'
           f'{" with kfax/ modified" if src.get("modified") else ""}), Python {env["python"]};'
           f' {env["cpu"]}, {env["cpu_count"]} cores, load average {env["load_average_start"]:.1f}'
           f' at the start and {env["load_average_end"]:.1f} at the end. Peers:'
           f' {", ".join(f"{k} {v}" for k, v in record["peer_versions"].items()) or "none"}.', '']
  for name, why in record['skipped'].items():
    lines.append(f'- **{name} skipped**: {why}.')
  return lines


def named(tasks: list[str]) -> str:
  """' (a, b)', or '' for none."""
  return f' ({", ".join(tasks)})' if tasks else ''


def summary(results: dict[str, Any]) -> list[str]:
  """One verdict per task, and the count of tasks kfax wins."""
  wins = [n for n, r in results.items() if r['race'][0]['contestant'] in KFAX
          and math.isfinite(r['race'][0]['median_seconds'])]
  fewest = [n for n, r in results.items() if any(
      x['contestant'] in KFAX and x['median_steps'] == min(y['median_steps'] for y in r['race'])
      and math.isfinite(x['median_steps']) for x in r['race'])]
  lines = ['## Verdict', '',
           f'kfax is the fastest to the target (median seconds) on {len(wins)} of {len(results)}'
           f' tasks{named(wins)}, and needs the fewest median steps (ties included) on'
           f' {len(fewest)}{named(fewest)}.', '']
  return lines + [f'- {verdict(n, r)}' for n, r in results.items()] + ['']


def markdown(results: dict[str, Any], record: dict[str, Any], command: str) -> str:
  """results/race.md: header, verdict, method, race tables and grid tables."""
  args = record['settings']
  lines = header(record, command) + summary(results) + [
      '## Method', '',
      'Seconds count the jitted training steps only (compilation and evaluation excluded), each'
      ' chunk of `eval_every` steps ended by `jax.block_until_ready`; the runs of a phase are'
      ' interleaved chunk by chunk. Grid pass on seed 0 (learning rates, then the second-stage'
      ' periods at the best rate, then kfax\'s statistics options at the best so far, then rates'
      ' beyond a grid edge); the best config of each contestant (fewest seconds to the target)'
      ' then runs on'
      f' {args["seeds"]} seed(s); the tables give medians, rows sorted by median seconds.'
      ' "x best peer": median seconds over the fastest other contestant\'s. Time cap: a run'
      f' stops once its clock passes max({args["grid_cap"]:g}x (grid) or {args["race_cap"]:g}x'
      f' (race) the fewest seconds any run of the phase needed, {CAP_FLOOR_S:g} s) and counts as'
      ' not arriving. Contestants:', ''] + CONTESTANT_NOTES + ['', '## Race', '']
  for name, result in results.items():
    lines += race_table(name, result, args['seeds']) + ['']
  lines += ['## Grid pass', '']
  for name, result in results.items():
    lines += grid_table(name, result) + ['']
  return '\n'.join(lines)


def median_run(r: dict[str, Any]) -> dict[str, Any]:
  """The run of the median seed (by seconds to the target, then the final metric)."""
  runs = sorted(r['runs'], key=lambda x: (x['seconds_to_target'], x['final_metric']))
  return runs[(len(runs) - 1) // 2]


COLORS = dict(zip(CONTESTANTS, ('tab:blue', 'tab:orange', 'tab:purple', 'tab:brown', 'tab:red',
                                'tab:green', 'tab:olive')))


def panel(ax: Any, name: str, result: dict[str, Any]) -> None:
  """One task: the median seed of each contestant's best config, log seconds."""
  import matplotlib.ticker
  for r in result['race']:
    _, seconds, metric, _ = zip(*median_run(r)['history'])
    ax.plot(seconds, metric, color=COLORS[r['contestant']], lw=1.3, label=r['label'])
  ax.axhline(result['target'], color='gray', ls='--', lw=0.8)
  ax.set(title=name, xlabel='training seconds (jitted steps only)', ylabel=result['metric'],
         xscale='log')
  finite = [h[2] for r in result['race'] for h in median_run(r)['history'] if math.isfinite(h[2])]
  if result['higher_is_better']:
    ax.set_ylim(max(min(finite), result['target'] - 0.3), 1.0)
  else:
    ax.set_ylim(min(finite) * 0.95, min(max(finite), 2 * result['target']))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.legend(fontsize=6, loc='best')


def plot(results: dict[str, Any], path: Path) -> bool:
  """Metric against training seconds, one panel per task."""
  plt = time_to_accuracy.pyplot()
  if plt is None:
    return False
  cols = min(3, len(results))
  rows = -(-len(results) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False)
  for ax, (name, result) in zip(axes.flat, results.items()):
    panel(ax, name, result)
  for ax in list(axes.flat)[len(results):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return True


# -------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags; `--quick` shrinks the run and writes to /tmp."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--tasks', default=','.join(TASKS), help=f'from {",".join(TASKS)}')
  p.add_argument('--contestants', default=','.join(CONTESTANTS),
                 help=f'from {",".join(CONTESTANTS)}')
  p.add_argument('--seeds', type=int, default=3, help='seeds of the race of the best configs')
  p.add_argument('--eval_every', type=int, default=10)
  p.add_argument('--extend', type=int, default=2, help='rounds of grid-edge extension')
  p.add_argument('--grid_cap', type=float, default=3.0,
                 help='grid pass: stop a run at this multiple of the fastest time to target')
  p.add_argument('--race_cap', type=float, default=5.0, help='the same, in the race of seeds')
  p.add_argument('--max_steps', type=int, help="override every task's step budget")
  p.add_argument('--quick', action='store_true',
                 help='one rate per contestant, kfax defaults, 1 seed, 100 steps, no extension;'
                      ' writes to /tmp unless --out/--md/--plot are given')
  p.add_argument('--replot', metavar='JSON',
                 help='rewrite the md and png from the JSON of an earlier run; nothing runs')
  p.add_argument('--out')
  p.add_argument('--md')
  p.add_argument('--plot')
  args = p.parse_args(argv)
  stem = Path('/tmp/race_quick') if args.quick else RESULTS / 'race'
  args.out = args.out or str(stem.with_suffix('.json'))
  args.md = args.md or str(stem.with_suffix('.md'))
  args.plot = args.plot or str(stem.with_suffix('.png'))
  if args.quick:
    args.seeds, args.extend, args.max_steps = 1, 0, args.max_steps or 100
  return args


INF_KEYS = {'steps_to_target', 'seconds_to_target', 'median_steps', 'median_seconds', 'steps',
            'seconds'}


def restore(tree: Any, key: str = '') -> Any:
  """`time_to_accuracy.finite` undone: None back to inf under the keys that hold infinities."""
  if isinstance(tree, dict):
    return {k: restore(v, k) for k, v in tree.items()}
  if isinstance(tree, list):
    return [restore(v, key) for v in tree]
  return math.inf if tree is None and key in INF_KEYS else tree


def replot(args: argparse.Namespace) -> None:
  """The md and png of a recorded run, from its JSON (its command, date and numbers)."""
  record = restore(json.loads(Path(args.replot).read_text()))
  Path(args.md).write_text(markdown(record['results'], record, record['command']) + '\n')
  wrote = [args.md] + ([args.plot] if plot(record['results'], Path(args.plot)) else [])
  print(f'wrote {", ".join(wrote)} from {args.replot}')


def main(argv: list[str] | None = None) -> None:
  """Runs the race on every task and writes the md, JSON and PNG results."""
  args = parse_args(argv)
  if args.replot:
    return replot(args)
  warnings.filterwarnings('ignore', message='Explicitly requested dtype float64')  # Shampoo's
  start = time.perf_counter()
  env = environment()
  wanted = args.contestants.split(',')
  peers, skipped = load_peers(wanted)
  contestants = [c for c in wanted if c not in skipped]
  print(f'jax {env["jax"]} on {env["cpu"]} ({env["cpu_count"]} cores), {env["date"]};'
        f' contestants {", ".join(contestants)}', flush=True)
  results = {}
  for name in args.tasks.split(','):
    task = TASKS[name](**({'max_steps': args.max_steps} if args.max_steps else {}))
    results[name] = run_task(task, contestants, peers, args)
    print('\n'.join(race_table(name, results[name], args.seeds)) + '\n', flush=True)
  env['load_average_end'] = os.getloadavg()[0]
  env['wall_s'] = time.perf_counter() - start
  command = ' '.join(['python benchmarks/race.py'] + (sys.argv[1:] if argv is None else argv))
  record = {'environment': env, 'settings': vars(args), 'command': command,
            'peer_versions': peer_versions(peers), 'skipped': skipped, 'results': results}
  text = markdown(results, record, command)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(time_to_accuracy.finite(record), f)
  Path(args.md).write_text(text + '\n')
  wrote = [args.md, args.out] + ([args.plot] if plot(results, Path(args.plot)) else [])
  print(f'wrote {", ".join(wrote)} ({env["wall_s"] / 60:.1f} min)')


if __name__ == '__main__':
  main()
