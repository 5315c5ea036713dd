"""examples/recipe.py, chainerkfac's ImageNet recipe, against references written here from the
seed's formulas (the learning-rate schedule, corrected momentum, weight-norm capping, running
mixup, random erasing, crops and mean subtraction), and inside a data-parallel `shard_map` step."""

import functools
import math
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import kfax
from utils import IMAGENET_TRAIN, SEED_IMAGENET

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'examples'))
import recipe

IMAGENET = IMAGENET_TRAIN
CONFIGS = SEED_IMAGENET  # the seed's six configs (tests/utils.py)


def seed_lr(epoch: float, lr: float, start: float, end: float, p: float) -> float:
  """LrPolynomialDecay.lr of the seed, in float64."""
  if epoch < start:
    return lr
  if epoch < end:
    return lr * (1.0 - (epoch - start) / (end - start)) ** p
  return 0.0


# ----------------------------------------------------------------------- learning rate


def test_seed_configs_match_the_published_values():
  """The config files (read by `recipe.SEED_CONFIGS`) hold the seed's values."""
  assert sorted(recipe.SEED_CONFIGS) == sorted(CONFIGS)
  for batch, values in CONFIGS.items():
    c = recipe.SEED_CONFIGS[batch]
    got = (c.epochs, c.lr, c.decay_start_epoch, c.power, c.polynomial_epoch, c.momentum,
           c.damping, c.mixup_alpha)
    np.testing.assert_allclose(got, values, rtol=0, atol=0, err_msg=str(batch))
    assert c.steps_per_epoch() == IMAGENET / batch


@pytest.mark.parametrize('batch', sorted(CONFIGS))
def test_polynomial_schedule_matches_the_seed(batch):
  epochs, lr, start, p, poly_epoch, *_ = CONFIGS[batch]
  spe = IMAGENET / batch
  end = max(epochs, poly_epoch)
  schedule = recipe.polynomial_schedule(lr, spe, epochs, start, poly_epoch, p)
  start_step, last = start * spe, int(epochs * spe)
  steps = sorted({0, 1, int(start_step) - 1, int(start_step), int(start_step) + 1,
                  int(start_step) + 2, last // 3, last // 2, last - 1, last,
                  int(end * spe) - 1, int(end * spe) + 1, int(end * spe) + 50,
                  *np.random.default_rng(batch).integers(0, last, 20).tolist()})
  want = np.array([seed_lr(s / spe, lr, start, end, p) for s in steps])
  got = np.asarray(jax.jit(schedule)(jnp.array(steps)))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12 * lr)
  # Constant, then strictly decaying, positive at the end of training (E > epochs), then 0.
  before = int(np.ceil(start_step)) - 1  # the last update with epoch < decay start
  assert float(schedule(before)) == pytest.approx(lr, rel=1e-7)
  assert float(schedule(before + 2)) < lr
  assert 0 < float(schedule(last)) < float(schedule(last // 2)) < lr
  assert float(schedule(int(end * spe) + 1)) == 0.0


def test_bs32k_ends_training_at_the_documented_fraction_of_the_peak():
  c = recipe.SEED_CONFIGS[32_768]
  final = float(c.schedule()(round(c.epochs * c.steps_per_epoch())))
  assert final / c.lr == pytest.approx(1.05e-4, rel=0.02)  # the facts file's 1.05e-4 x lr0


def test_polynomial_schedule_rejects_an_empty_decay():
  with pytest.raises(ValueError):
    recipe.polynomial_schedule(0.1, 10.0, 5, decay_start_epoch=5, polynomial_epoch=2, power=2)


# ---------------------------------------------------------------------------- momentum


def seed_heavy_ball(lrs, grads, momentum, adjust=True):
  """KFACUpdateRule.update_core_cpu, in float64: the parameters after each step."""
  param, v, lr_pre, out = np.zeros_like(grads[0]), np.zeros_like(grads[0]), lrs[0], []
  for lr, g in zip(lrs, grads):
    m = momentum * lr / lr_pre if adjust and lr < lr_pre else momentum
    v = m * v - lr * g
    param = param + v
    lr_pre = lr
    out.append(param.copy())
  return out


def run_tx(tx, grads):
  """The parameters after each update of `tx` from zero, for the gradient sequence `grads`."""
  params = {'w': jnp.zeros(grads[0].shape)}
  state, out = jax.jit(tx.init)(params), []
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update({'w': jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, u)
    out.append(np.asarray(params['w']))
  return out, state


DECREASING = [0.1, 0.1, 0.08, 0.05, 0.05, 0.01, 0.002]
INCREASING = [0.01, 0.02, 0.05, 0.05, 0.1, 0.03, 0.01]


@pytest.mark.parametrize('lrs', [DECREASING, INCREASING])
@pytest.mark.parametrize('adjust', [True, False])
def test_corrected_momentum_matches_the_seed_update_rule(lrs, adjust):
  grads = list(np.random.default_rng(0).standard_normal((len(lrs), 5)))
  schedule = lambda count: jnp.asarray(lrs, jnp.float32)[count]
  tx = recipe.corrected_momentum_sgd(schedule, 0.9, adjust_momentum=adjust)
  got, state = run_tx(tx, grads)
  want = seed_heavy_ball(lrs, grads, 0.9, adjust)
  np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-5, atol=1e-6)
  assert float(state.hyperparams['learning_rate']) == pytest.approx(lrs[-1])
  # The correction matters on these sequences: the other setting gives other parameters.
  other = seed_heavy_ball(lrs, grads, 0.9, not adjust)
  assert np.abs(np.stack(other) - np.stack(want)).max() > 1e-3


def test_corrected_momentum_equals_optax_sgd_for_a_decreasing_rate_only():
  grads = list(np.random.default_rng(1).standard_normal((len(DECREASING), 5)))
  for lrs, same in ((DECREASING, True), (INCREASING, False)):
    schedule = lambda count, lrs=lrs: jnp.asarray(lrs, jnp.float32)[count]
    ours, _ = run_tx(recipe.corrected_momentum_sgd(schedule, 0.9), grads)
    sgd, _ = run_tx(optax.sgd(schedule, momentum=0.9), grads)
    gap = np.abs(np.stack(ours) - np.stack(sgd)).max()
    assert (gap < 1e-5) if same else (gap > 1e-3), (lrs, gap)


def test_composes_after_kfac_and_first_update_is_minus_lr_times_the_preconditioned_gradient():
  model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
  x = jax.random.normal(jax.random.key(0), (8, 5))
  y = jax.random.randint(jax.random.key(1), (8,), 0, 3)
  params = jax.jit(model.init)(jax.random.key(2), x)['params']
  loss_fn = lambda p, x, y: kfax.softmax_cross_entropy(model.apply({'params': p}, x), y)
  grad_fn = kfax.value_grad_and_stats(loss_fn, fisher='empirical')
  table = grad_fn.layers(params, x, y)
  schedule = recipe.polynomial_schedule(0.05, 2.0, 4, 1, 5, 2.0)
  kfac = lambda: kfax.kfac(table, damping=1e-2, inverse_every=1)
  tx = optax.chain(kfac(), recipe.corrected_momentum_sgd(schedule, 0.9), recipe.weight_norm_cap())
  ref = optax.chain(kfac(), optax.sgd(0.05))  # K-FAC, then -lr times its output

  @jax.jit
  def step(params):
    _, grads, stats = grad_fn(params, x, y)
    u, state = tx.update(grads, tx.init(params), params, stats=stats)
    u_ref, _ = ref.update(grads, ref.init(params), params, stats=stats)
    return grads, u, u_ref, state

  grads, u, u_ref, state = step(params)
  # The kernels are far below their caps here: the cap passes the updates through unchanged.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), u, u_ref)
  assert np.abs(np.asarray(u['layers_0']['kernel'])).max() > 1e-4
  assert not np.allclose(u['layers_0']['kernel'], -0.05 * grads['layers_0']['kernel'],
                         rtol=1e-2)  # K-FAC did precondition
  assert int(state[1].count) == 1


# ------------------------------------------------------------------- weight-norm capping


def numpy_cap(w):
  w = np.asarray(w, np.float64)
  s = np.sqrt(2.0 * w.shape[-1]) / (np.linalg.norm(w) + 1e-9)
  return w * s if s < 1 else w


def tree_params():
  rng = np.random.default_rng(0)
  f = lambda *shape, s=1.0: jnp.asarray(s * rng.standard_normal(shape), jnp.float32)
  return {
      'Conv_0': {'kernel': f(3, 3, 4, 8, s=2.0), 'bias': f(8, s=50.0)},  # cap 4; norm ~24
      'Conv_1': {'kernel': f(3, 3, 8, 8, s=0.05)},  # norm ~1.2 < cap 4
      'Dense_0': {'kernel': f(16, 10, s=3.0), 'bias': f(10, s=50.0)},  # cap sqrt(20); norm ~38
      'Dense_1': {'kernel': f(16, 10, s=0.1)},
      'BatchNorm_0': {'scale': f(8, s=100.0), 'bias': f(8, s=100.0)},
      'Embed_0': {'embedding': f(20, 6, s=10.0)},
      'odd': {'kernel': f(30, s=10.0)},  # a 1-D "kernel" is not a conv / dense kernel
  }


def test_kernel_mask_selects_conv_and_dense_kernels_of_a_linen_model():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), use_bias=True)(x))
      x = nn.LayerNorm()(nn.Dense(5)(x.reshape(x.shape[0], -1)))
      return nn.Dense(2, use_bias=False)(x) + nn.Embed(3, 2)(jnp.zeros(x.shape[0], jnp.int32))

  params = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((1, 4, 4, 2)))['params']
  flat = {'/'.join(recipe._key_name(k) for k in path): m for path, m in
          jax.tree_util.tree_leaves_with_path(recipe.kernel_mask(params))}
  assert {k for k, m in flat.items() if m} == {'Conv_0/kernel', 'Dense_0/kernel',
                                              'Dense_1/kernel'}
  assert len(flat) == 10  # 3 kernels, conv and dense biases, BN and LN scales and biases, embed


def test_cap_weight_norms_against_numpy():
  params = tree_params()
  capped = jax.jit(recipe.cap_weight_norms)(params)
  for layer in params:
    for name, p in params[layer].items():
      got, p = np.asarray(capped[layer][name]), np.asarray(p)
      if name == 'kernel' and p.ndim >= 2:
        np.testing.assert_allclose(got, numpy_cap(p), rtol=1e-6, err_msg=layer)
      else:
        np.testing.assert_array_equal(got, p, err_msg=f'{layer}/{name}')
  for layer in ('Conv_0', 'Dense_0'):  # above their caps: rescaled to exactly the cap
    w = np.asarray(capped[layer]['kernel'], np.float64)
    assert np.linalg.norm(w) == pytest.approx(np.sqrt(2 * w.shape[-1]), rel=1e-6)
    assert np.linalg.norm(np.asarray(params[layer]['kernel'])) > 2 * np.sqrt(2 * w.shape[-1])
  for layer in ('Conv_1', 'Dense_1'):  # below: bit for bit unchanged
    np.testing.assert_array_equal(capped[layer]['kernel'], params[layer]['kernel'])


def test_weight_norm_cap_transform_caps_params_plus_updates():
  params = tree_params()
  rng = np.random.default_rng(1)
  updates = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  tx = recipe.weight_norm_cap()
  state = tx.init(params)
  new_updates, _ = jax.jit(tx.update)(updates, state, params)
  got = optax.apply_updates(params, new_updates)
  want = jax.jit(lambda p, u: recipe.cap_weight_norms(optax.apply_updates(p, u)))(params, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
  # Non-kernels: the updates pass through bit for bit.
  np.testing.assert_array_equal(new_updates['BatchNorm_0']['scale'],
                                updates['BatchNorm_0']['scale'])
  w = np.asarray(got['Dense_0']['kernel'], np.float64)
  assert np.linalg.norm(w) == pytest.approx(np.sqrt(20.0), rel=1e-5)
  with pytest.raises(ValueError):
    tx.update(updates, state)


# --------------------------------------------------------------------------------- mixup

N, CLASSES = 1024, 4  # the global batch of the data-parallel augmentation below: 128 per device


@functools.cache
def augment():
  """`recipe.mixup_and_erase` as in a data-parallel step: inside `jax.shard_map` over the 8 CPU
  devices, the batch and the carried previous batch sharded, each device folding its index into
  the replicated key. alpha and the erasing rate are traced: one compilation for all tests."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))

  def local(key, x, y, prev_x, prev_y, alpha, rate):
    key = jax.random.fold_in(key, jax.lax.axis_index('data'))
    return recipe.mixup_and_erase(key, x, y, (prev_x, prev_y), alpha, rate=rate)

  d = P('data')
  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), d, d, d, d, P(), P()),
                             out_specs=(d, d, (d, d))))
  put = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, d))

  def run(key, x, y, prev_x, prev_y, alpha, rate):
    out = fn(key, *map(put, (x, y, prev_x, prev_y)), jnp.float32(alpha), jnp.float32(rate))
    return jax.tree.map(np.asarray, out)

  return run, mesh


def batches(seed=0):
  """Images without zeros; class 0 only in the current batch (its soft label is lambda)."""
  rng = np.random.default_rng(seed)
  cur, prev = (rng.uniform(1, 2, (N, 8, 8, 3)).astype(np.float32) for _ in range(2))
  labels = np.eye(CLASSES, dtype=np.float32)[np.zeros(N, int)]
  prev_labels = np.eye(CLASSES, dtype=np.float32)[rng.integers(1, CLASSES, N)]
  return cur, labels, prev, prev_labels


@pytest.mark.parametrize('alpha', [0.4, 1.0])
def test_mixup_lambda_mixing_labels_and_carried_state(alpha):
  run, _ = augment()
  cur, labels, prev, prev_labels = batches()
  images, soft, (carried_x, carried_y) = run(jax.random.key(0), cur, labels, prev, prev_labels,
                                             alpha, 0.0)  # rate 0: mixup alone
  lam = soft[:, 0].astype(np.float64)
  assert lam.min() >= 0.5 and lam.max() <= 1.0
  assert np.unique(lam).size > N // 2  # one lambda per example (and device), not per batch
  l4 = lam[:, None, None, None]
  np.testing.assert_allclose(images, l4 * cur + (1 - l4) * prev, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(soft, lam[:, None] * labels + (1 - lam[:, None]) * prev_labels,
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(carried_x, images)  # running: the mixed batch is carried
  np.testing.assert_array_equal(carried_y, soft)
  # E max(l, 1 - l) = 1/2 + E|2l - 1| / 2 with E|2l - 1| = 1 / (alpha B(1/2, alpha)) for
  # l ~ Beta(alpha, alpha): 3/4 for alpha = 1, 0.8398 for alpha = 0.4.
  beta_half = math.gamma(0.5) * math.gamma(alpha) / math.gamma(alpha + 0.5)
  want = 0.5 + 0.5 / (alpha * beta_half)
  assert lam.mean() == pytest.approx(want, abs=0.02)  # std of the mean < 0.006
  assert lam.mean() == pytest.approx({0.4: 0.8398, 1.0: 0.75}[alpha], abs=0.02)
  # Same key, same draws; another key, others.
  np.testing.assert_array_equal(run(jax.random.key(0), cur, labels, prev, prev_labels, alpha,
                                    0.0)[0], images)
  assert not np.array_equal(run(jax.random.key(1), cur, labels, prev, prev_labels, alpha, 0.0)[0],
                            images)


def test_mix_not_running_and_the_first_batch():
  cur, labels, prev, prev_labels = (jnp.asarray(a[:16]) for a in batches())
  lam = jnp.linspace(0.5, 1.0, 16)
  images, soft, carried = recipe.mix(lam, cur, labels, prev, prev_labels, running=False)
  l4 = np.asarray(lam)[:, None, None, None]
  np.testing.assert_allclose(images, l4 * np.asarray(cur) + (1 - l4) * np.asarray(prev),
                             rtol=1e-6)
  np.testing.assert_array_equal(carried[0], cur)  # not running: the unmixed batch is carried
  np.testing.assert_array_equal(carried[1], labels)
  # The first batch: its own previous batch gives exactly the identity; or no previous batch.
  images, soft, carried = recipe.mix(lam, cur, labels, cur, labels)
  np.testing.assert_array_equal(images, cur)
  np.testing.assert_array_equal(soft, labels)
  images, soft, carried = recipe.mixup(jax.random.key(0), cur, labels, None, None, 0.6)
  assert images is cur and soft is labels and carried[0] is cur


# ------------------------------------------------------------------------- random erasing

erase = jax.jit(recipe.random_erasing)  # rate traced: one compilation per shape


def boxes(images: np.ndarray):
  """(applied, top, left, height, width) of each image's zeroed rectangle (inputs without 0)."""
  out = []
  for image in images:
    zero = (image == 0)
    assert (zero.all(-1) == zero.any(-1)).all()  # every channel alike
    zero = zero.all(-1)
    if not zero.any():
      out.append((False, 0, 0, 0, 0))
      continue
    rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
    top, left, h, w = rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert zero[top:top + h, left:left + w].all() and zero.sum() == h * w  # a full rectangle
    out.append((True, top, left, h, w))
  return out


def test_random_erasing_area_aspect_position_and_rate():
  n, size = 1000, 40
  images = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (n, size, size, 2)), jnp.float32)
  erased = np.asarray(erase(jax.random.key(0), images, 0.5))
  found = boxes(erased)
  applied = [b for b in found if b[0]]
  assert abs(len(applied) / n - 0.5) < 0.05  # rate 0.5 (binomial std 0.013)
  for a, x, b in zip(erased, np.asarray(images), found):
    if b[0]:  # outside the box, the image is untouched
      np.testing.assert_array_equal(a[a != 0], x[a != 0])
    else:  # not erased: bit for bit the input
      np.testing.assert_array_equal(a, x)
  _, top, left, h, w = map(np.array, zip(*applied))
  frac = h * w / size**2
  # The seed rounds sqrt(A r) and sqrt(A / r) (area A, aspect r) to whole pixels, so a box h x w
  # comes from A in [(h - 1/2)(w - 1/2), (h + 1/2)(w + 1/2)) and r in ((s - 1/2) / (l + 1/2),
  # (s + 1/2) / (l - 1/2)) with s, l = min, max(h, w): both ranges must meet the seed's.
  short, long = np.minimum(h, w), np.maximum(h, w)
  assert ((short - 0.5) * (long - 0.5) <= 0.25 * size**2).all()
  assert ((short + 0.5) * (long + 0.5) >= 0.02 * size**2).all()
  assert ((short + 0.5) / (long - 0.5) >= 0.3).all()
  assert frac.min() < 0.04 and frac.max() > 0.21  # it spans the range
  ratio = short / long
  assert ratio.min() < 0.4 and ratio.max() > 0.9  # and that of the aspect ratio
  assert (h > w).sum() > 0.3 * len(h) and (w > h).sum() > 0.3 * len(h)  # swapped half the time
  # The seed draws top in [0, H - h - 1]: the box never reaches the last row or column.
  assert (top + h <= size - 1).all() and (left + w <= size - 1).all()
  assert top.min() == 0 and left.min() == 0 and (top + h).max() == size - 1
  # Deterministic for a key, different for another; rate 0: untouched, rate 1: all erased.
  np.testing.assert_array_equal(erase(jax.random.key(0), images, 0.5), erased)
  assert not np.array_equal(erase(jax.random.key(1), images, 0.5), erased)
  np.testing.assert_array_equal(erase(jax.random.key(0), images, 0.0), images)
  assert all(b[0] for b in boxes(np.asarray(erase(jax.random.key(0), images, 1.0))))


# ------------------------------------------------------------------------------- shard_map


def test_recipe_step_under_shard_map_with_a_sharded_batch():
  """Two data-parallel steps as in examples/_common.py: each device augments its share of the
  batch (mixup with its previous share, then erasing), gradients are averaged, and the optimizer
  (corrected momentum, then the norm cap) updates the replicated params: they must match the same
  optimizer on the gradient of the whole augmented batch, unsharded."""
  run, mesh = augment()
  x0, y0, x1, _ = batches(1)
  y1 = np.eye(CLASSES, dtype=np.float32)[np.random.default_rng(2).integers(0, CLASSES, N)]
  # First batch: its own previous batch (not mixed); second: mixed with the carried first.
  xs0, _, prev = run(jax.random.key(0), x0, y0, x0, y0, 0.6, 0.5)
  xs, ys, (px, py) = run(jax.random.key(1), x1, y1, *prev, 0.6, 0.5)
  kept = xs0 != 0
  np.testing.assert_array_equal(xs0[kept], x0[kept])  # first batch: only erased
  np.testing.assert_array_equal(prev[0], xs0)  # carried: the erased first batch
  np.testing.assert_array_equal(px, xs)  # carried: the mixed and erased batch
  np.testing.assert_array_equal(py, ys)
  erased = (xs == 0).all(-1).any((1, 2))
  assert abs(erased.mean() - 0.5) < 0.1
  # Outside the erased box, each image mixes x1 with the carried (erased) first batch.
  c0, c1 = y0.argmax(1), y1.argmax(1)
  differ = c0 != c1
  lam = ys[np.arange(N), c1][differ, None, None, None].astype(np.float64)
  assert lam.min() >= 0.5
  want = lam * x1[differ] + (1 - lam) * xs0[differ]
  keep = xs[differ] != 0
  np.testing.assert_allclose(xs[differ][keep], want[keep], rtol=1e-5, atol=1e-6)

  rng = np.random.default_rng(0)
  params = {'Dense_0': {'kernel': jnp.asarray(rng.standard_normal((192, 4)), jnp.float32),
                        'bias': jnp.zeros(4)}}
  schedule = recipe.polynomial_schedule(1.0, 2.0, 4, 1, 5, 2)
  tx = optax.chain(recipe.corrected_momentum_sgd(schedule, 0.9), recipe.weight_norm_cap())

  def loss(p, x, y):
    logits = x.reshape(x.shape[0], -1) @ p['Dense_0']['kernel'] + p['Dense_0']['bias'][None]
    return optax.softmax_cross_entropy(logits, y).mean()

  def local(params, opt_state, x, y):
    varying = jax.tree.map(lambda p: jax.lax.pcast(p, 'data', to='varying'), params)
    grads = jax.lax.pmean(jax.grad(loss)(varying, x, y), 'data')
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P('data'), P('data')),
                               out_specs=(P(), P())))

  @jax.jit
  def reference(params, opt_state, x, y):
    grads = jax.grad(loss)(params, x, y)  # mean over the batch = mean of the device means
    return optax.apply_updates(params, tx.update(grads, opt_state, params)[0])

  opt_state = jax.jit(tx.init)(params)
  put = lambda a: jax.device_put(a, jax.sharding.NamedSharding(mesh, P('data')))
  new_params, _ = step(params, opt_state, put(xs), put(ys))
  want = reference(params, opt_state, jnp.asarray(xs), jnp.asarray(ys))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_params,
               want)
  kernel = np.asarray(new_params['Dense_0']['kernel'], np.float64)
  assert np.linalg.norm(kernel) == pytest.approx(np.sqrt(8.0), rel=1e-5)  # capped (~28 before)


def test_training_accuracy_is_against_the_unmixed_labels():
  """The examples' loss (`_common.make_loss`) is the cross-entropy against the mixed targets,
  and its accuracy compares the logits with the unmixed integer labels, as the seed reports it."""
  import _common

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      del train
      return nn.Dense(3)(x)

  x = 10 * jnp.eye(3)  # logits 10 * kernel: argmax 0, 1, 2
  params = {'Dense_0': {'kernel': jnp.eye(3), 'bias': jnp.zeros(3)}}
  labels = jnp.array([0, 1, 0])
  targets = jax.nn.one_hot(jnp.array([2, 2, 2]), 3) * 0.7 + 0.1  # mixed towards class 2
  loss, (batch_stats, accuracy) = _common.make_loss(Linear())(params, x, targets, labels,
                                                              batch_stats={})
  assert accuracy == pytest.approx(2 / 3) and batch_stats == {}
  want = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(10 * jnp.eye(3)), -1))
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
