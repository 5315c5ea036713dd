"""chainerkfac's ImageNet training recipe (Osawa et al., CVPR 2019) as small, pure JAX pieces.

The seed (`tyohei/chainerkfac`, `examples/imagenet/`) trains ResNet-50-D with K-FAC and:

* a polynomial learning-rate decay after a constant phase, no warmup (`polynomial_schedule`);
* heavy-ball momentum whose coefficient is scaled by lr_t / lr_{t-1} when the rate has just
  decreased (`corrected_momentum_sgd`, chained after `kfax.kfac`);
* no weight decay: after every update each conv / dense kernel's norm is capped at
  sqrt(2 d_out) (`weight_norm_cap`, the last link of the chain, or `cap_weight_norms`);
* "running" mixup with the previous (already mixed) batch and random erasing
  (`mixup`, `random_erasing`, or both in the seed's order with `mixup_and_erase`);
* a per-pixel mean image subtracted from random 224 crops with flips (the input pipeline's:
  `examples/_data.py`).

Everything here is a pure function or an optax transformation: no Python state, no host syncs,
fixed shapes (masks instead of dynamic slices of data-dependent size), so it runs under `jit` and
inside `jax.shard_map` with the batch sharded. Per-device randomness is the caller's: fold the
device index into the key (`jax.random.fold_in(key, jax.lax.axis_index('data'))`), as the seed's
GPUs each drew their own. Images are NHWC; labels for mixup are one-hot (or soft) rows.

`SEED_CONFIGS` reads the six published ImageNet configurations (one per global batch size) from
`examples/configs/`, their one source.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

IMAGENET_TRAIN_SIZE = 1_281_167

# Random erasing and mixup settings common to all of the seed's ImageNet configs.
ERASE_RATE = 0.5
ERASE_AREA = (0.02, 0.25)  # fraction of the image
ERASE_ASPECT_MIN = 0.3  # the aspect ratio is drawn from [ERASE_ASPECT_MIN, 1], then maybe swapped


@dataclasses.dataclass(frozen=True)
class SeedConfig:
  """One of chainerkfac's `configs/bs*.json` (the values that differ between them)."""

  batch_size: int  # global: 32 per GPU x GPUs x acc_iters
  epochs: int  # the trainer's stop (the README's epochs + 1)
  lr: float
  decay_start_epoch: float  # `epoch_lr_decay_start`
  power: float  # `polynomial_decay_p`
  polynomial_epoch: float  # `polynomial_epoch`; the decay ends at max(epochs, this)
  momentum: float
  damping: float
  mixup_alpha: float

  def steps_per_epoch(self, train_size: int = IMAGENET_TRAIN_SIZE) -> float:
    """The seed's epochs are Chainer's fractional `epoch_detail`: updates x batch / train size,
    not a whole number of updates per epoch."""
    return train_size / self.batch_size

  def schedule(self, train_size: int = IMAGENET_TRAIN_SIZE) -> optax.Schedule:
    return polynomial_schedule(self.lr, self.steps_per_epoch(train_size), self.epochs,
                               self.decay_start_epoch, self.polynomial_epoch, self.power)


def _seed_configs() -> dict[int, SeedConfig]:
  """The six configurations from `examples/configs/imagenet_bs*.toml`, their one source."""
  configs = {}
  for path in sorted(pathlib.Path(__file__).parent.glob('configs/imagenet_bs*.toml')):
    with open(path, 'rb') as f:
      c = tomllib.load(f)
    configs[c['batch_size']] = SeedConfig(
        c['batch_size'], c['epochs'], c['lr'], c['decay_start_epoch'], c['poly_power'],
        c['poly_end_epoch'], c['momentum'], c['damping'], c['mixup_alpha'])
  return configs


SEED_CONFIGS = _seed_configs()


# ----------------------------------------------------------------------- learning rate


def polynomial_schedule(base_lr: float, steps_per_epoch: float, epochs: float,
                        decay_start_epoch: float, polynomial_epoch: float | None = None,
                        power: float = 2.0) -> optax.Schedule:
  """The seed's `LrPolynomialDecay` (`examples/imagenet/train.py`) as a schedule of the update
  count: with e = count / steps_per_epoch, s = decay_start_epoch and
  E = max(epochs, polynomial_epoch),

      lr(e) = base_lr                          for e < s,
      lr(e) = base_lr (1 - (e - s) / (E - s))^p  for s <= e < E,
      lr(e) = 0                                for e >= E.

  e is Chainer's `epoch_detail`, 0-based and fractional (0 at the first update), and the seed
  updates the rate after each update, so update k (0-based) uses lr(k / steps_per_epoch): exactly
  an optax schedule of the update count. `steps_per_epoch` may be fractional (train size / batch,
  as in the seed). No warmup: the seed's branch commented "linear warmup" returns rate 1.0 (its
  code, which we follow, and not its comment). With the published configs E > epochs, so the rate
  never reaches 0 during training.

  `optax.polynomial_schedule` is not used: its integer `transition_begin` / `transition_steps`
  would round the seed's fractional-epoch boundaries to whole updates.
  """
  end = max(epochs, polynomial_epoch if polynomial_epoch is not None else epochs)
  if not end > decay_start_epoch:
    raise ValueError(f'the decay must end (max(epochs, polynomial_epoch) = {end}) after it starts'
                     f' ({decay_start_epoch})')
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}')

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    epoch = jnp.asarray(count, jnp.float32) / steps_per_epoch
    done = jnp.clip((epoch - decay_start_epoch) / (end - decay_start_epoch), 0.0, 1.0)
    return base_lr * (1.0 - done) ** power

  return schedule


# ---------------------------------------------------------------------------- momentum


class HeavyBallState(NamedTuple):
  velocity: Any  # the last update (the learning rate is inside it)
  lr_pre: jax.Array  # the previous update's learning rate


def heavy_ball(learning_rate: jax.typing.ArrayLike, momentum: jax.typing.ArrayLike,
               adjust_momentum: bool = True) -> optax.GradientTransformation:
  """The seed's `KFACUpdateRule` for fixed hyperparameters (`chainerkfac/optimizers/kfac.py`):

      m = momentum * lr / lr_pre  if adjust_momentum and lr < lr_pre, else momentum,
      v <- m v - lr g,   params <- params + v   (the update is v),

  with lr_pre the previous update's rate (initially this one's, as the seed seeds `lr_pre` with
  `lr`). Use it through `corrected_momentum_sgd`, which feeds it the scheduled rate each step."""

  def init(params):
    return HeavyBallState(jax.tree.map(jnp.zeros_like, params), jnp.asarray(learning_rate))

  def update(updates, state, params=None):
    del params
    lr = jnp.asarray(learning_rate)
    m = jnp.asarray(momentum)
    if adjust_momentum:
      decreased = lr < state.lr_pre
      m = jnp.where(decreased, m * lr / jnp.where(decreased, state.lr_pre, 1.0), m)
    velocity = jax.tree.map(lambda v, g: (m * v - lr * g).astype(v.dtype), state.velocity,
                            updates)
    return velocity, HeavyBallState(velocity, lr.astype(state.lr_pre.dtype))

  return optax.GradientTransformation(init, update)


def corrected_momentum_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float,
                           adjust_momentum: bool = True) -> optax.GradientTransformationExtraArgs:
  """SGD with the seed's heavy-ball momentum and momentum correction (Goyal et al. 2017): the
  coefficient is momentum * lr_t / lr_{t-1} on updates whose rate lr_t is below the previous one,
  else momentum; the rate sits inside the velocity (`heavy_ball`). `learning_rate` may be a
  schedule (`optax.inject_hyperparams` evaluates it on its update count, and exposes the current
  rate as `state.hyperparams['learning_rate']`). Chain it after K-FAC:
  `optax.chain(kfax.kfac(table, ...), corrected_momentum_sgd(schedule, 0.97))`.

  Note: for a non-increasing rate that stays positive (the seed's schedule), this equals
  `optax.sgd(schedule, momentum)` up to rounding: optax keeps the rate outside its trace, and
  -lr_t (g_t + m trace_{t-1}) = m (lr_t / lr_{t-1}) (-lr_{t-1} trace_{t-1}) - lr_t g_t is the
  corrected recursion. The two differ when the rate rises (a warmup: the seed keeps `momentum`,
  optax effectively scales it up) or with `adjust_momentum=False`."""
  return optax.inject_hyperparams(heavy_ball, static_args='adjust_momentum')(
      learning_rate=learning_rate, momentum=momentum, adjust_momentum=adjust_momentum)


# ------------------------------------------------------------------- weight-norm capping


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def kernel_mask(params: Any) -> Any:
  """Python bools: True for conv / dense kernels, the leaves named `kernel` with ndim >= 2
  (linen's `Dense`, `Conv`, `DenseGeneral`); False for biases, norm scales and biases,
  embeddings. The seed tags all conv W and the FC W (`normalize_weight`), never BN parameters or
  biases. Shapes suffice (`jax.ShapeDtypeStruct` leaves, e.g. from `jax.eval_shape`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: bool(path) and _key_name(path[-1]) == 'kernel' and len(p.shape) >= 2,
      params)


def _cap_scale(kernel: jax.Array, eps: float) -> jax.Array:
  """The seed's s = sqrt(2 d_out) / (||W|| + eps), in float32."""
  target = jnp.sqrt(2.0 * kernel.shape[-1])  # d_out: linen kernels end with the output axis
  return target / (jnp.sqrt(jnp.sum(jnp.square(kernel.astype(jnp.float32)))) + eps)


def _cap(kernel: jax.Array, eps: float) -> jax.Array:
  scale = _cap_scale(kernel, eps)
  return jnp.where(scale < 1.0, kernel * scale.astype(kernel.dtype), kernel)


def cap_weight_norms(params: Any, mask: Any = None, eps: float = 1e-9) -> Any:
  """The seed's `NormalizeWeightUR` post-update hook (`examples/imagenet/train.py`; the
  replacement for weight decay): for each masked kernel W, s = sqrt(2 d_out) / (||W|| + 1e-9)
  with ||.|| the Frobenius norm of the whole kernel and d_out = `W.shape[0]` in Chainer's
  (out, in, ...) layout, i.e. `W.shape[-1]` in linen's (..., in, out); if s < 1, W <- s W.
  `mask` (default `kernel_mask(params)`) selects the kernels; other leaves pass unchanged.
  (The seed's optional `--nw_skip_scale_comp`, a cached scale, is off by default: not here.)"""
  mask = kernel_mask(params) if mask is None else mask
  return jax.tree.map(lambda p, m: _cap(p, eps) if m else p, params, mask)


def weight_norm_cap(mask: Any = None, eps: float = 1e-9) -> optax.GradientTransformation:
  """`cap_weight_norms` as the last link of an optax chain: it changes the updates so that
  `optax.apply_updates(params, updates)` is `cap_weight_norms(params + updates)` (up to one
  rounding). Chosen over calling `cap_weight_norms` after `apply_updates` because the training
  step then needs no change (the recipe is entirely `make_optimizer`'s), the momentum state is
  untouched by the cap (as in the seed, whose hook rescales only the weights), and it works
  wherever the params are (replicated under `shard_map`; no communication). `mask`: a tree of
  bools or a function of the params (default `kernel_mask`)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('weight_norm_cap needs the params: tx.update(updates, state, params)')
    m = kernel_mask(params) if mask is None else mask(params) if callable(mask) else mask

    def one(u, p, k):
      if not k:
        return u
      new = optax.apply_updates(p, u)
      scale = _cap_scale(new, eps)  # uncapped kernels keep their updates bit for bit
      return jnp.where(scale < 1.0, (new * scale.astype(new.dtype) - p).astype(u.dtype), u)

    return jax.tree.map(one, updates, params, m), state

  return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------------- mixup


def mixup_lambda(key: jax.Array, n: int, alpha: jax.typing.ArrayLike) -> jax.Array:
  """The seed's per-example mixing weights: l ~ Beta(alpha, alpha), lam = max(l, 1 - l) >= 1/2
  (`np.random.beta(alpha, alpha, nbatch)` in `ResNet50._mixup`). `alpha` may be traced."""
  draw = jax.random.beta(key, alpha, alpha, (n,), jnp.float32)
  return jnp.maximum(draw, 1.0 - draw)


def mix(lam: jax.Array, images: jax.Array, labels_onehot: jax.Array, prev_images: jax.Array,
        prev_labels: jax.Array,
        running: bool = True) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
  """`mixup` for given weights `lam` (one per example): lam x + (1 - lam) x_prev for images and
  labels; the carried batch is the mixed one if `running`, else the current one."""

  def combine(cur, prev):
    w = (1.0 - lam).reshape(-1, *[1] * (cur.ndim - 1)).astype(cur.dtype)
    return cur + w * (prev - cur)  # = lam cur + (1 - lam) prev, exactly cur when prev is cur

  mixed_images, mixed_labels = combine(images, prev_images), combine(labels_onehot, prev_labels)
  new_prev = (mixed_images, mixed_labels) if running else (images, labels_onehot)
  return mixed_images, mixed_labels, new_prev


def mixup(key: jax.Array, images: jax.Array, labels_onehot: jax.Array,
          prev_images: jax.Array | None, prev_labels: jax.Array | None,
          alpha: jax.typing.ArrayLike,
          running: bool = True) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
  """The seed's mixup with the previous batch (`ResNet50._mixup`, `models/resnet50_d.py`): per
  example, l ~ Beta(alpha, alpha), lam = max(l, 1 - l) >= 1/2 (`mixup_lambda`), and

      mixed = lam * images + (1 - lam) * prev_images,
      mixed_labels = lam * labels_onehot + (1 - lam) * prev_labels   (soft targets for the loss).

  Returns `(mixed_images, mixed_labels, new_prev)`; carry `new_prev` to the next call. With
  `running=True` (all of the seed's configs) it is the mixed batch, else the current unmixed one.
  The first batch is not mixed: pass `prev_images=prev_labels=None` (a separate trace), or pass
  the current batch as its own previous one (exactly the identity, one compiled step).
  Accuracy should be measured against the unmixed labels, as the seed's is. The seed mixes each
  device's share of the batch with that device's previous share; with accumulation, the
  previous micro-batch. `mixup_and_erase` also reproduces what the seed carries with erasing."""
  if prev_images is None:
    return images, labels_onehot, (images, labels_onehot)
  lam = mixup_lambda(key, images.shape[0], alpha)
  return mix(lam, images, labels_onehot, prev_images, prev_labels, running)


# ------------------------------------------------------------------------- random erasing


def _erase_box(u: jax.Array, height: int, width: int, area: tuple[float, float],
               aspect_min: float) -> tuple[jax.Array, ...]:
  """The seed's rectangle (`ResNet50._random_erase`) from the U[0, 1) draws `u[:5]`:
  (top, left, erase_h, erase_w)."""
  size = height * width * (area[0] + (area[1] - area[0]) * u[0])
  aspect = aspect_min + (1.0 - aspect_min) * u[1]
  eh = jnp.floor(jnp.sqrt(size * aspect) + 0.5).astype(jnp.int32)  # Python's int(x + .5)
  ew = jnp.floor(jnp.sqrt(size / aspect) + 0.5).astype(jnp.int32)
  swap = u[2] < 0.5
  eh, ew = jnp.where(swap, ew, eh), jnp.where(swap, eh, ew)
  eh, ew = jnp.minimum(eh, height), jnp.minimum(ew, width)
  # random.randint(0, max(h - eh - 1, 0)) includes both ends: the seed's box never reaches the
  # last row / column unless it spans the image (kept: the seed's behavior).
  def randint(v, high):  # uniform on {0, ..., high}
    return jnp.minimum(jnp.floor(v * (high + 1)).astype(jnp.int32), high)

  top = randint(u[3], jnp.maximum(height - eh - 1, 0))
  left = randint(u[4], jnp.maximum(width - ew - 1, 0))
  return top, left, eh, ew


def erase_one(key: jax.Array, image: jax.Array, rate: float = ERASE_RATE,
              area: tuple[float, float] = ERASE_AREA,
              aspect_min: float = ERASE_ASPECT_MIN) -> jax.Array:
  """Random erasing of one (H, W, C) image (the seed's `_random_erase` for one example): with
  probability `rate`, a rectangle of area fraction ~ U(area) and aspect ratio ~ U(aspect_min, 1),
  its height and width swapped with probability 1/2, at a uniform position, is set to 0 in every
  channel (0 is the mean after mean subtraction). Fixed shapes: the box is a mask. (One draw of
  six uniforms per image: cheap to compile and to run.)"""
  u = jax.random.uniform(key, (6,))
  height, width = image.shape[:2]
  apply = u[5] < rate  # the seed skips when uniform(0, 1) > rate
  top, left, eh, ew = _erase_box(u, height, width, area, aspect_min)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew) & apply
  return jnp.where(box[..., None], jnp.zeros((), image.dtype), image)


def random_erasing(key: jax.Array, images: jax.Array, rate: float = ERASE_RATE,
                   area: tuple[float, float] = ERASE_AREA,
                   aspect_min: float = ERASE_ASPECT_MIN) -> jax.Array:
  """`erase_one` on each image of an (N, H, W, C) batch, with independent keys (vmapped)."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: erase_one(k, x, rate, area, aspect_min))(keys, images)


def mixup_and_erase(key: jax.Array, images: jax.Array, labels_onehot: jax.Array,
                    prev: tuple[jax.Array, jax.Array] | None, alpha: jax.typing.ArrayLike,
                    running: bool = True, rate: jax.typing.ArrayLike = ERASE_RATE,
                    area: tuple[float, float] = ERASE_AREA,
                    aspect_min: float = ERASE_ASPECT_MIN,
                    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
  """The seed's training-time input path (`ResNet50.__call__`): `mixup`, then `random_erasing`
  of the mixed batch. With `running=True` the carried previous batch is the mixed *and erased*
  one: the seed erases in place the array it has just stored as its prior. Returns
  `(images, soft_labels, new_prev)`; `prev` is None for the first batch, or the current batch
  itself (`(images, labels_onehot)`, the same result in the same compiled step). `alpha` and
  `rate` may be traced."""
  k_mix, k_erase = jax.random.split(key)
  prev_images, prev_labels = (None, None) if prev is None else prev
  mixed, labels, new_prev = mixup(k_mix, images, labels_onehot, prev_images, prev_labels, alpha,
                                  running)
  erased = random_erasing(k_erase, mixed, rate, area, aspect_min)
  return erased, labels, ((erased, labels) if running else new_prev)
