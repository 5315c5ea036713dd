"""Final test accuracy against batch size at equal epochs: K-FAC with chainerkfac's recipe vs SGD.

The seed (chainerkfac, Osawa et al., CVPR 2019) claims that K-FAC keeps ImageNet accuracy at
batch sizes where SGD loses it. This script checks the claim on data that ships with
scikit-learn: the digits MLP of `examples/digits.py` (64-128-128-10, ReLU) on its fixed
stratified split (1437 train / 360 test images, `digits.load_data()`), trained at 1x, 4x, 16x and
64x a base batch B0 for the same number of epochs, so larger batches take proportionally fewer
steps (B0 = 22: 65, 16, 4 and 1 steps per epoch).

Optimizers (a fresh model per run; a seed sets the initialization, the data order and the mixup
draws, and both optimizers get the same ones):

- **K-FAC, the seed's recipe** (`examples/recipe.py`): `optax.chain(kfax.kfac(table,
  damping=λ, damping_mode='factored', ema_decay=0, inverse_every=1, norm_constraint=None),
  recipe.corrected_momentum_sgd(schedule, m), recipe.weight_norm_cap())`, the empirical Fisher,
  statistics and inverses every step (fresh factors, as the seed's `cov_ema_decay: 1.0`), no
  warmup, no weight decay (the cap replaces it). The seed's six ImageNet configs are mapped onto
  our four sizes by batch ratio: 1x -> 4K, 4x -> 16K, 16x -> 64K, 64x -> 128K (its largest, 32x
  its smallest). From the mapped config we take the polynomial schedule's shape (power p, decay
  start and end as fractions of the run), the mixup alpha, the learning-rate scaling and the
  momentum trend:
  * learning rate: the grid is centred on 0.01 x (seed lr / seed lr at 4K) = 0.01 x 1, 3.06,
    4.89, 8.56: the seed's rate grows like B^0.62 over its 32x range (between the square-root
    and the linear rule);
  * momentum: the seed *lowers* momentum as the batch grows (0.997 at 4K ... 0.93 at 128K),
    keeping the momentum horizon 1/(1 - m) at about one epoch of updates (1.06, 0.85, 1.02 and
    1.46 epochs for the mapped configs). We keep those horizons in epochs:
    m = 1 - 1 / (h x steps per epoch), which gives 0.986, 0.927, 0.756 and 0.316. A second
    K-FAC series uses momentum 0.9 at every size instead;
  * damping: tuned on {1e-3, 1e-2, 1e-1} (the seed's 1e-4 - 2.5e-4 are for ImageNet batches of
    thousands; our factors come from 22-1408 examples);
  * running mixup (the seed mixes each batch with the previous, already mixed one, per-example
    λ = max(l, 1 - l), l ~ Beta(α, α)): run as a separate series at the selected K-FAC settings
    (not re-tuned), α from the mapped config (0.4, 0.4, 0.6, 1.0). The seed's random erasing,
    built for 224x224 photographs, is not used on 8x8 digits.
- **SGD with momentum 0.9** (`optax.sgd`), Goyal et al. (2017): the linear scaling rule
  lr = 0.1 x B / B0 (0.1: the best of {0.01, 0.03, 0.1, 0.2, 0.3} at B0 in a trial run), a linear
  warmup over the first 2.5 epochs (Goyal's 5 of 90 epochs, scaled to our run; at least one
  step), then the *same* polynomial decay as K-FAC at that batch size. Its grid is the linear-rule
  rate times 2^(k/2), k = -12 ... 2 (2^-6 ... 2, 15 values, as many as K-FAC's 5 x 3). Mixup at the
  selected rate as a separate series too. No weight decay.
- **No decay** (`sgd_const`, `kfac_const`): both again, each tuned on its own grid, with the rate
  held constant (SGD keeps its warmup). The seed's polynomial decay leaves a 64x run only ~50
  steps, most of them at a small rate, and a trial run showed SGD doing better there without
  it; this pair checks that the comparison does not hinge on the schedule.

Protocol: every grid point runs on seed 0; the best by final test accuracy (ties: lower final
loss on the whole training set) is then run on seeds 1 ... S-1, and the table reports the median
final test accuracy over the S seeds and their min / max. The selection uses the test set (no
validation split: the data set is small), for both optimizers alike, so the absolute numbers are
optimistic; the comparison is what matters. One test image is 0.28 percentage points.

Speed: each run is one compiled `jax.lax.scan` over all its steps, with the hyperparameters as
traced arguments, so each (optimizer, batch size, mixup) compiles once. The runs are sequential:
`jax.vmap` of the K-FAC run over a hyperparameter grid hung at 0% CPU on this jax 0.10.2 CPU
build (batched Cholesky; see the LAPACK deadlock in README.md). The script defaults
`OPENBLAS_NUM_THREADS=1` and `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` (one XLA thread: the
matrices are tiny, and pinned to one core with `taskset` the K-FAC step was ~20% faster than on
two busy cores; same results to the bit).

Run (about 10 minutes on one core of a busy 2-core CPU machine):

    taskset -c 1 python benchmarks/large_batch.py
    python benchmarks/large_batch.py --quick --md /tmp/lb.md --png /tmp/lb.png   # smoke test

Writes `benchmarks/results/large_batch.md` and `benchmarks/results/large_batch.png`.
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false')

import argparse
import dataclasses
import datetime
import itertools
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfax

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'examples'))
import digits  # the model, the data split, the kfax loss
import recipe  # chainerkfac's recipe

CLASSES = 10
SEED_BATCH = {1: 4_096, 4: 16_384, 16: 65_536, 64: 131_072}  # our multiple -> seed config
KFAC_LR_ANCHOR = 0.01  # K-FAC grid centre at B0 (times the seed's lr ratio at larger batches)
SGD_LR_ANCHOR = 0.1  # SGD's rate at B0; the linear rule scales it by B / B0
SGD_WARMUP_EPOCHS = 2.5
KFAC_LR_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)
KFAC_DAMPINGS = (1e-3, 1e-2, 1e-1)
SGD_LR_FACTORS = tuple(2.0 ** (k / 2) for k in range(-12, 3))


@dataclasses.dataclass(frozen=True)
class Setting:
  """The per-batch-size settings derived from the seed's mapped config."""

  multiple: int
  batch: int
  steps_per_epoch: int
  epochs: int
  seed_config: recipe.SeedConfig
  power: float
  decay_start: float  # epochs
  decay_end: float  # epochs
  horizon: float  # the seed's momentum horizon, in epochs
  momentum: float  # ours, same horizon
  alpha: float
  kfac_lr_center: float
  sgd_lr_linear: float

  @property
  def steps(self) -> int:
    return self.steps_per_epoch * self.epochs


def make_setting(multiple: int, b0: int, epochs: int, train_size: int) -> Setting:
  cfg = recipe.SEED_CONFIGS[SEED_BATCH[multiple]]
  base = recipe.SEED_CONFIGS[SEED_BATCH[1]]
  batch = b0 * multiple
  spe = train_size // batch
  if spe < 1:
    raise ValueError(f'batch {batch} exceeds the training set ({train_size})')
  end = max(cfg.epochs, cfg.polynomial_epoch)
  horizon = cfg.batch_size / recipe.IMAGENET_TRAIN_SIZE / (1.0 - cfg.momentum)  # epochs
  return Setting(
      multiple=multiple, batch=batch, steps_per_epoch=spe, epochs=epochs, seed_config=cfg,
      power=cfg.power, decay_start=epochs * cfg.decay_start_epoch / cfg.epochs,
      decay_end=epochs * end / cfg.epochs, horizon=horizon,
      momentum=1.0 - 1.0 / (horizon * spe), alpha=cfg.mixup_alpha,
      kfac_lr_center=KFAC_LR_ANCHOR * cfg.lr / base.lr, sgd_lr_linear=SGD_LR_ANCHOR * multiple)


def epoch_plan(train_size: int, s: Setting, seed: int) -> np.ndarray:
  """(steps, batch) indices: a fresh permutation per epoch, the remainder dropped."""
  rng = np.random.default_rng(seed)
  per = s.steps_per_epoch * s.batch
  return np.stack([rng.permutation(train_size)[:per] for _ in range(s.epochs)]).reshape(
      s.steps, s.batch).astype(np.int32)


def make_run(opt: str, s: Setting, use_mixup: bool, constant: bool,
             data: dict[str, jax.Array]):
  """A jitted `run(key, plan, lr, damping, momentum, alpha) -> (test acc, train loss, last
  minibatch loss)` that trains a fresh MLP for all of `plan`'s steps in one `lax.scan`.
  `constant`: no decay (the rate stays at `lr`; SGD keeps its warmup)."""
  model = digits.MLP()
  loss_fn = digits.make_loss(model)  # kfax.softmax_cross_entropy: takes one-hot / soft labels
  x_train, y_train = data['x_train'], jax.nn.one_hot(data['y_train'], CLASSES)
  x_test, y_test = data['x_test'], data['y_test']
  table = kfax.value_grad_and_stats(loss_fn).layers(
      jax.eval_shape(lambda: model.init(jax.random.key(0), x_train[:1]))['params'],
      x_train[:s.batch], y_train[:s.batch])
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='empirical')
  warmup = max(1, round(SGD_WARMUP_EPOCHS * s.steps_per_epoch))

  def run(key, plan, lr, damping, momentum, alpha):
    init_key, mix_key = jax.random.split(key)
    params = model.init(init_key, x_train[:1])['params']
    poly = (lambda count: lr * jnp.ones_like(jnp.asarray(count, jnp.float32))) if constant \
        else recipe.polynomial_schedule(lr, s.steps_per_epoch, s.epochs, s.decay_start,
                                        s.decay_end, s.power)
    if opt == 'kfac':
      tx = optax.chain(
          kfax.kfac(table, damping=damping, damping_mode='factored', ema_decay=0.0,
                    inverse_every=1, norm_constraint=None),
          recipe.corrected_momentum_sgd(poly, momentum),
          recipe.weight_norm_cap())
    else:
      tx = optax.sgd(lambda c: poly(c) * jnp.minimum(1.0, (c + 1.0) / warmup), momentum=0.9)
    first = plan[0]
    carry = (params, tx.init(params), (x_train[first], y_train[first]))  # step 0 mixes with itself

    def body(carry, inputs):
      params, opt_state, prev = carry
      idx, step = inputs
      x, y = x_train[idx], y_train[idx]
      if use_mixup:
        x, y, prev = recipe.mixup(jax.random.fold_in(mix_key, step), x, y, *prev, alpha)
      if opt == 'kfac':
        loss, grads, stats = grad_fn(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
      else:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, prev), loss

    (params, _, _), losses = jax.lax.scan(
        body, carry, (plan, jnp.arange(plan.shape[0])))
    logits = model.apply({'params': params}, x_test)
    acc = jnp.mean(jnp.argmax(logits, -1) == y_test)
    return acc, loss_fn(params, x_train, y_train), losses[-1]

  return jax.jit(run)


@dataclasses.dataclass
class Result:
  series: str
  multiple: int
  lr: float
  damping: float | None
  momentum: float
  seed: int
  accuracy: float
  train_loss: float
  seconds: float
  steps: int

  @property
  def diverged(self) -> bool:
    return not math.isfinite(self.train_loss)


class Runner:
  """Compiles each (optimizer, batch size, mixup) once and runs configurations on it."""

  def __init__(self, data_np: dict[str, np.ndarray]):
    self.data = {k: jnp.asarray(v) for k, v in data_np.items()}
    self.train_size = len(data_np['y_train'])
    self.compiled: dict[tuple, Any] = {}
    self.compile_seconds = 0.0
    self.results: list[Result] = []

  def __call__(self, series: str, s: Setting, seed: int, lr: float,
               damping: float | None = None, momentum: float = 0.9) -> Result:
    opt, use_mixup, constant, _ = SERIES[series]
    plan = jnp.asarray(epoch_plan(self.train_size, s, seed))
    args = (jax.random.key(seed), plan, jnp.float32(lr), jnp.float32(damping or 0.0),
            jnp.float32(momentum), jnp.float32(s.alpha))
    key = (opt, s.batch, use_mixup, constant)
    if key not in self.compiled:
      start = time.perf_counter()
      self.compiled[key] = make_run(opt, s, use_mixup, constant, self.data).lower(*args).compile()
      self.compile_seconds += time.perf_counter() - start
    start = time.perf_counter()
    acc, train_loss, _ = jax.block_until_ready(self.compiled[key](*args))
    seconds = time.perf_counter() - start
    r = Result(series, s.multiple, lr, damping, momentum, seed, float(acc), float(train_loss),
               seconds, s.steps)
    self.results.append(r)
    return r


SERIES = {
    # name: (optimizer, mixup, constant rate, description)
    'sgd': ('sgd', False, False, "SGD m=0.9, linear rule + warmup, seed's decay, lr grid"),
    'kfac': ('kfac', False, False, "K-FAC, seed's recipe (momentum trend), lr x damping grid"),
    'kfac_m09': ('kfac', False, False, "K-FAC, seed's recipe but momentum 0.9, lr x damping grid"),
    'kfac_mixup': ('kfac', True, False, "K-FAC as 'kfac' + running mixup (kfac's selection)"),
    'sgd_mixup': ('sgd', True, False, "SGD as 'sgd' + running mixup (sgd's selection)"),
    'sgd_const': ('sgd', False, True, "SGD as 'sgd' but no decay (constant after warmup)"),
    'kfac_const': ('kfac', False, True, "K-FAC as 'kfac' but no decay (constant lr)"),
}


def grid(series: str, s: Setting, quick: bool) -> list[dict[str, float]]:
  if SERIES[series][0] == 'sgd':
    factors = SGD_LR_FACTORS[::4] if quick else SGD_LR_FACTORS
    return [dict(lr=s.sgd_lr_linear * f) for f in factors]
  momentum = 0.9 if series == 'kfac_m09' else s.momentum
  factors = KFAC_LR_FACTORS[1::2] if quick else KFAC_LR_FACTORS
  dampings = KFAC_DAMPINGS[:2] if quick else KFAC_DAMPINGS
  return [dict(lr=s.kfac_lr_center * f, damping=d, momentum=momentum)
          for d, f in itertools.product(dampings, factors)]


def best(results: list[Result]) -> Result:
  return max(results, key=lambda r: (r.accuracy if not r.diverged else -1.0,
                                     -r.train_loss if not r.diverged else -math.inf))


def summarize(rs: list[Result]) -> dict[str, Any]:
  accs = [r.accuracy for r in rs]
  return dict(median=statistics.median(accs), min=min(accs), max=max(accs), accs=accs,
              ms_per_step=1e3 * statistics.median(r.seconds / r.steps for r in rs),
              diverged=sum(r.diverged for r in rs))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
  data_np = digits.load_data()
  train_size = len(data_np['y_train'])
  settings = [make_setting(m, args.b0, args.epochs, train_size) for m in args.multiples]
  runner = Runner(data_np)
  seeds = range(args.seeds)
  chosen: dict[tuple[str, int], Result] = {}
  summary: dict[tuple[str, int], dict[str, Any]] = {}
  for s in settings:
    for series in args.series:
      if series.endswith('_mixup'):  # the selection of its base series, not re-tuned
        base = chosen.get((series.removesuffix('_mixup'), s.multiple))
        if base is None:
          continue
        rs = [runner(series, s, seed, base.lr, base.damping, base.momentum) for seed in seeds]
        chosen[(series, s.multiple)] = rs[0]
      else:
        tried = [runner(series, s, 0, **g) for g in grid(series, s, args.quick)]
        pick = best(tried)
        chosen[(series, s.multiple)] = pick
        rs = [pick] + [runner(series, s, seed, pick.lr, pick.damping, pick.momentum)
                       for seed in seeds if seed != 0]
      summary[(series, s.multiple)] = summarize(rs)
      sm = summary[(series, s.multiple)]
      pick = chosen[(series, s.multiple)]
      print(f'{series:<11} {s.batch:>5} lr {pick.lr:<9.4g} damping {pick.damping or "-":<6} '
            f'm {pick.momentum:.3f}  median {sm["median"]:.4f} [{sm["min"]:.4f}, '
            f'{sm["max"]:.4f}]  {sm["ms_per_step"]:.2f} ms/step', flush=True)
  return dict(settings=settings, runner=runner, chosen=chosen, summary=summary)


def kfax_source() -> str:
  git = lambda *a: subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True,
                                  check=False).stdout
  try:
    commit = git('rev-parse', '--short', 'HEAD').strip()
    dirty = bool(git('status', '--porcelain', '--', 'kfax', 'examples/recipe.py',
                     'examples/digits.py').strip())
  except OSError:
    return 'unknown'
  return f'{commit}{" + uncommitted changes in kfax/ or examples/" if dirty else ""}'


def plot(out: dict[str, Any], args: argparse.Namespace, path: str) -> None:
  """Left: the seed's schedule (the comparison asked for, and its momentum / mixup variants).
  Right: both optimizers without the decay (constant rate), the seed-schedule pair faded."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  panels = [[s for s in args.series if not s.endswith('_const')],
            [s for s in ('sgd', 'kfac') if s in args.series]
            + [s for s in args.series if s.endswith('_const')]]
  panels = [p for p in panels if p]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), sharey=True,
                           squeeze=False)
  styles = {'sgd': ('tab:blue', 'o', '-'), 'sgd_mixup': ('tab:blue', 'o', ':'),
            'kfac': ('tab:red', 's', '-'), 'kfac_m09': ('tab:orange', '^', '--'),
            'kfac_mixup': ('tab:red', 's', ':'), 'sgd_const': ('tab:cyan', 'D', '-.'),
            'kfac_const': ('tab:purple', 'v', '-.')}
  batches = {s.multiple: s.batch for s in out['settings']}
  for j, (ax, names) in enumerate(zip(axes[0], panels)):
    for i, series in enumerate(names):
      pts = [(batches[m], out['summary'][(series, m)]) for m in args.multiples
             if (series, m) in out['summary']]
      if not pts:
        continue
      x = np.array([b for b, _ in pts], float) * 2 ** (0.05 * (i - (len(names) - 1) / 2))
      med = np.array([p['median'] for _, p in pts])
      err = np.array([[p['median'] - p['min'] for _, p in pts],
                      [p['max'] - p['median'] for _, p in pts]])
      color, marker, line = styles.get(series, ('k', 'x', '-'))
      faded = j == 1 and not series.endswith('_const')
      ax.errorbar(x, 100 * med, yerr=100 * err, color=color, marker=marker, linestyle=line,
                  capsize=3, alpha=0.3 if faded else 1.0, label=SERIES[series][3])
    ax.set_xscale('log', base=2)
    ax.set_xticks(list(batches.values()))
    ax.set_xticklabels([f'{b}\n({m}x)' for m, b in batches.items()])
    ax.minorticks_off()
    ax.set_xlabel(f'batch size ({args.epochs} epochs each)')
    ax.set_title("the seed's polynomial decay" if j == 0 else 'no decay (constant rate)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='lower left')
  axes[0][0].set_ylabel(f'final test accuracy, % (median, min-max of {args.seeds} seeds)')
  fig.suptitle('digits MLP, equal epochs: final test accuracy vs batch size')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


NOTES = [
    '## Notes', '',
    "- Momentum: the seed's configs lower momentum as the batch grows (0.997 at 4K to 0.93 at "
    '128K), holding 1/(1 - m) near one epoch of updates; `kfac` keeps that horizon, which gives '
    '0.316 at 64x here. `kfac_m09` (0.9 everywhere) is the check that this extrapolation is not '
    'what decides the result.',
    "- K-FAC's grids are flat: most (lr, damping) points land within a few test images of each "
    'other, so the seed-0 selection mostly picks noise (the selected point is sometimes a grid '
    "corner for that reason); seeds 1 and 2 are unbiased. SGD's grids have a clear interior peak "
    'and fall off sharply above it at large batch (divergence to 10% accuracy).',
    '- Mixup runs reuse the selection of their base series and are not re-tuned.',
    '- Each run is one `lax.scan`; runs are sequential because `jax.vmap` of the K-FAC run over '
    'a hyperparameter grid hung at 0% CPU on jax 0.10.2 CPU (batched Cholesky), like the LAPACK '
    'deadlock described in `benchmarks/README.md`.',
]


def fmt(v: float | None) -> str:
  return '-' if v is None else f'{v:.3g}'


def write_md(out: dict[str, Any], args: argparse.Namespace, env: dict[str, Any],
             path: str) -> None:
  settings, summary, chosen = out['settings'], out['summary'], out['chosen']
  runner: Runner = out['runner']
  lines = [
      '# Large batch on digits: K-FAC (chainerkfac recipe) vs SGD at equal epochs', '',
      f'`{env["command"]}`', '',
      f'- date: {env["date"]}; machine: {env["machine"]}; load average (1 min) '
      f'{env["load_start"]:.1f} at the start, {env["load_end"]:.1f} at the end; '
      f'{env["pinning"]}',
      f'- jax {jax.__version__}, kfax at {env["source"]}, Python {platform.python_version()}',
      f'- runtime {env["seconds"]:.0f} s ({runner.compile_seconds:.0f} s of it compiling), '
      f'{len(runner.results)} training runs',
      f'- model: the digits MLP (64-128-128-10) of `examples/digits.py`; data: '
      f'`digits.load_data()` ({runner.train_size} train / {len(runner.data["y_test"])} test); '
      f'B0 = {args.b0}, {args.epochs} epochs at every batch size (remainder dropped per epoch); '
      f'{args.seeds} seeds (init, data order, mixup)',
      '- selection: each grid on seed 0, best final test accuracy (ties: lower final '
      'training-set loss); the chosen configuration is then run on the other seeds', '',
      '## Settings per batch size', '',
      '| multiple | batch | steps/epoch | steps | seed config | poly p | decay start / end '
      '(epochs) | K-FAC momentum (seed horizon, epochs) | mixup α | K-FAC lr grid | SGD lr '
      'grid |',
      '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for s in settings:
    kl = ', '.join(f'{s.kfac_lr_center * f:.3g}' for f in
                   (KFAC_LR_FACTORS[1::2] if args.quick else KFAC_LR_FACTORS))
    sl = [s.sgd_lr_linear * f for f in (SGD_LR_FACTORS[::4] if args.quick else SGD_LR_FACTORS)]
    lines.append(
        f'| {s.multiple}x | {s.batch} | {s.steps_per_epoch} | {s.steps} | '
        f'bs{s.seed_config.batch_size} | {s.power:g} | {s.decay_start:.2f} / {s.decay_end:.2f} '
        f'| {s.momentum:.3f} ({s.horizon:.2f}) | {s.alpha:g} | {kl} | {sl[0]:.3g} ... '
        f'{sl[-1]:.3g} (x√2) |')
  damp = KFAC_DAMPINGS[:2] if args.quick else KFAC_DAMPINGS
  lines += ['', f'K-FAC damping grid: {", ".join(f"{d:g}" for d in damp)} (factored, π-corrected).'
            f' SGD warmup: {SGD_WARMUP_EPOCHS} epochs (at least 1 step), linear from 0.', '',
            '## Results', '',
            '| series | batch | lr | damping | momentum | median acc | min | max | per seed | '
            'ms/step |',
            '|---|---|---|---|---|---|---|---|---|---|']
  for series in args.series:
    for s in settings:
      if (series, s.multiple) not in summary:
        continue
      sm, c = summary[(series, s.multiple)], chosen[(series, s.multiple)]
      per = ', '.join(f'{a:.4f}' for a in sm['accs'])
      div = f' ({sm["diverged"]} diverged)' if sm['diverged'] else ''
      lines.append(f'| {series} | {s.batch} | {c.lr:.4g} | {fmt(c.damping)} | '
                   f'{c.momentum:.3f} | {sm["median"]:.4f} | {sm["min"]:.4f} | '
                   f'{sm["max"]:.4f} | {per}{div} | {sm["ms_per_step"]:.2f} |')
  lines += ['', '![final test accuracy vs batch size](large_batch.png)', '',
            '## Conclusion', '', *conclusion(out, args), '', *NOTES, '',
            '## Every grid point (seed 0): final test accuracy', '']
  for series in args.series:
    if series.endswith('_mixup'):
      continue
    for s in settings:
      rs = [r for r in runner.results if r.series == series and r.multiple == s.multiple
            and r.seed == 0]
      if not rs:
        continue
      if SERIES[series][0] == 'sgd':
        cells = ', '.join(f'{r.lr:.3g}: {"div" if r.diverged else f"{r.accuracy:.4f}"}'
                          for r in rs)
        lines.append(f'- {series}, batch {s.batch}: {cells}')
      else:
        lines.append(f'- {series}, batch {s.batch} (rows damping, columns lr '
                     f'{", ".join(f"{r.lr:.3g}" for r in rs if r.damping == rs[0].damping)}):')
        for d in sorted({r.damping for r in rs}):
          cells = ' '.join('div   ' if r.diverged else f'{r.accuracy:.4f}'
                           for r in rs if r.damping == d)
          lines.append(f'  - {d:g}: {cells}')
  Path(path).write_text('\n'.join(lines) + '\n')


def conclusion(out: dict[str, Any], args: argparse.Namespace) -> list[str]:
  """What was measured, as sentences generated from the numbers."""
  summary, settings, runner = out['summary'], out['settings'], out['runner']
  n_test = len(runner.data['y_test'])
  lo, hi = settings[0], settings[-1]
  lines = []
  drops = {}
  for name in args.series:
    if (name, lo.multiple) in summary and (name, hi.multiple) in summary:
      a, b = summary[(name, lo.multiple)]['median'], summary[(name, hi.multiple)]['median']
      drops[name] = b - a
      lines.append(f'- {name}: median {100 * a:.2f}% at batch {lo.batch}, {100 * b:.2f}% at '
                   f'{hi.batch} ({100 * (b - a):+.2f} points, {(b - a) * n_test:+.0f} test '
                   'images).')
  pairs = [(k, g) for k, g in (('kfac', 'sgd'), ('kfac_const', 'sgd_const'))
           if k in drops and g in drops]
  for kname, gname in pairs:
    lines.append('')
    for s in settings:
      k, g = summary[(kname, s.multiple)], summary[(gname, s.multiple)]
      ku, gu = ([r.accuracy for r in runner.results if r.series == series
                 and r.multiple == s.multiple and r.seed != 0] for series in (kname, gname))
      extra = (f'; seeds 1-{args.seeds - 1} (not used for selection) '
               f'{100 * statistics.mean(ku):.2f}% vs {100 * statistics.mean(gu):.2f}% (mean)'
               if ku and gu else '')
      lines.append(f'- batch {s.batch}: {kname} - {gname} = '
                   f'{100 * (k["median"] - g["median"]):+.2f} points in the median; {kname} min '
                   f'{100 * k["min"]:.2f}% vs {gname} max {100 * g["max"]:.2f}%{extra}; time per '
                   f"step {k['ms_per_step'] / g['ms_per_step']:.1f}x {gname}'s.")
    grid0 = lambda series: [r for r in runner.results if r.series == series
                            and r.multiple == hi.multiple and r.seed == 0 and not r.diverged]
    sgd_best = max(r.accuracy for r in grid0(gname))
    for series in ((kname, 'kfac_m09') if kname == 'kfac' else (kname,)):
      rs = grid0(series)
      if rs:
        above = sum(r.accuracy > sgd_best for r in rs)
        lines.append(f'- batch {hi.batch}, seed 0: {above} of {len(rs)} grid points of {series} '
                     f"(any lr, any damping) beat {gname}'s best grid point "
                     f'({100 * sgd_best:.2f}%).')
  lines.append('')
  for kname, gname in pairs:
    kd, sd = drops[kname], drops[gname]
    gap = summary[(kname, hi.multiple)]['median'] - summary[(gname, hi.multiple)]['median']
    verdict = 'holds accuracy better than' if kd > sd else 'does not hold accuracy better than'
    lines.append(f'Measured ({kname} vs {gname}): from {lo.multiple}x to {hi.multiple}x at equal '
                 f'epochs, K-FAC {verdict} SGD here: its median changes by {100 * kd:+.2f} '
                 f"points, SGD's by {100 * sd:+.2f}; at batch {hi.batch} K-FAC - SGD = "
                 f'{100 * gap:+.2f} points ({gap * n_test:+.0f} test images).')
  lines += ['',
            'Caveats: selection on the test set (seed 0), for both optimizers alike; one test '
            f'image is {100 / n_test:.2f} points, so differences of one or two images are noise; '
            'equal epochs, not equal time (K-FAC computes statistics and Cholesky inverses every '
            "step); SGD has a short linear warmup, momentum 0.9, no weight decay and no norm cap; "
            "two schedule shapes were tried (the seed's polynomial decay, no decay), no others "
            '(cosine, longer warmups, LARS); one small MLP on one small data set.']
  return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--b0', type=int, default=22, help='base batch size (64 x B0 <= 1437)')
  p.add_argument('--epochs', type=int, default=50)
  p.add_argument('--multiples', default='1,4,16,64', help=f'from {sorted(SEED_BATCH)}')
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--series', default='sgd,kfac,kfac_m09,kfac_mixup,sgd_mixup,sgd_const,'
                 'kfac_const',
                 help=f'from {",".join(SERIES)}')
  p.add_argument('--quick', action='store_true', help='a small grid (smoke test)')
  p.add_argument('--md', default=str(ROOT / 'benchmarks/results/large_batch.md'))
  p.add_argument('--png', default=str(ROOT / 'benchmarks/results/large_batch.png'))
  args = p.parse_args(argv)
  args.multiples = [int(m) for m in args.multiples.split(',')]
  args.series = args.series.split(',')
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  start = time.perf_counter()
  try:
    affinity = sorted(os.sched_getaffinity(0))
  except AttributeError:
    affinity = []
  pinned = 0 < len(affinity) < (os.cpu_count() or 0)
  env = dict(
      command=' '.join([*(['taskset', '-c', ','.join(map(str, affinity))] if pinned else []),
                        'python', 'benchmarks/large_batch.py',
                        *(sys.argv[1:] if argv is None else argv)]),
      date=datetime.datetime.now().isoformat(timespec='minutes'),
      machine=f'{platform.machine()}, {os.cpu_count()} cores, CPU only',
      pinning=f'process pinned to cores {affinity} of {os.cpu_count()}' if pinned
      else 'not pinned',
      load_start=os.getloadavg()[0], source=kfax_source())
  print(f'jax {jax.__version__} ({jax.devices()[0].platform}), B0={args.b0}, '
        f'{args.epochs} epochs, {args.seeds} seeds; {env["pinning"]}', flush=True)
  out = run_all(args)
  env.update(seconds=time.perf_counter() - start, load_end=os.getloadavg()[0])
  print(f'total {env["seconds"]:.0f} s ({out["runner"].compile_seconds:.0f} s compiling)')
  print('\n'.join(conclusion(out, args)))
  Path(args.md).parent.mkdir(parents=True, exist_ok=True)
  write_md(out, args, env, args.md)
  plot(out, args, args.png)
  print(f'wrote {args.md} and {args.png}')


if __name__ == '__main__':
  main()
