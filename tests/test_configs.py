"""chainerkfac's ImageNet recipe in `examples/`: the six `examples/configs/imagenet_*.toml` files
against the seed's table, `--config` (the command line overrides the file; unknown fields and
ill-typed values are errors naming the file and field), and `--arch resnet50d` (the seed's
ResNet-50-D: parameter count, stem and shortcut structure, BatchNorm and initializers), and the
scripts' errors for bad flags. (The script's end-to-end run with a config, ResNet-50-D and the
recipe's regularization is tests/test_examples.py's ImageNet run.)"""

import math
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from utils import IMAGENET_TRAIN, SEED_IMAGENET

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'examples'))

import _common  # noqa: E402
import cifar10  # noqa: E402
import resnet_imagenet as imagenet  # noqa: E402

CONFIGS = ROOT / 'examples' / 'configs'
SEED = SEED_IMAGENET  # the seed's table (tests/utils.py)
README_EPOCHS = {4_096: 35, 8_192: 35, 16_384: 35, 32_768: 45, 65_536: 60, 131_072: 80}
# Common to all six, as our flags: normalize_weight, lr_plan "polynomial", adjust_momentum,
# cov_ema_decay 1.0 (the weight of the new statistic: ema_decay 0 here), running_mixup, re_rate,
# re_area_rl/rh, re_aspect_rl; what the seed's code does anyway (statistics and inverses every
# step, empirical Fisher, π-factored damping, no KL clipping, no weight decay); its model.
COMMON = {
    'arch': 'resnet50d', 'width': 64, 'image_size': 224, 'optimizer': 'kfac',
    'weight_norm_cap': True, 'lr_schedule': 'poly', 'momentum_correction': True,
    'ema_decay': 0.0, 'running_mixup': True, 'random_erasing': 0.5,
    'random_erasing_area': [0.02, 0.25], 'random_erasing_aspect': 0.3, 'stats_every': 1,
    'inverse_every': 1, 'fisher': 'empirical', 'damping_mode': 'factored',
    'norm_constraint': 0.0, 'weight_decay': 0.0,
}
NAMES = {4_096: 'bs4k', 8_192: 'bs8k', 16_384: 'bs16k', 32_768: 'bs32k', 65_536: 'bs64k',
         131_072: 'bs128k'}


def parse(*argv: str):
  return _common.parse_args(imagenet.TASK, imagenet.__doc__, list(argv))


def config(batch: int) -> str:
  return str(CONFIGS / f'imagenet_{NAMES[batch]}.toml')


# ----------------------------------------------------------------------------------- configs


def test_the_six_configs_are_there():
  assert sorted(p.name for p in CONFIGS.glob('*.toml')) == sorted(
      f'imagenet_{name}.toml' for name in NAMES.values())


@pytest.mark.parametrize('batch', sorted(SEED))
def test_config_has_the_seed_values(batch):
  epoch, lr, start, power, end, momentum, damping, alpha = SEED[batch]
  args = parse('--config', config(batch))
  for name, value in COMMON.items():
    assert getattr(args, name) == value, name
  assert args.batch_size == batch
  # 32 images per device on 8 devices (the README's formula: 4096 = 32 x 8 x 16).
  assert args.acc_iters * 32 * 8 == batch
  assert args.epochs == epoch == README_EPOCHS[batch] + 1  # the code, not the README
  assert args.eval_every == IMAGENET_TRAIN // batch  # once an epoch, as the seed
  assert (args.lr, args.decay_start_epoch, args.poly_power, args.poly_end_epoch) == (
      lr, start, power, end)
  assert (args.momentum, args.damping, args.mixup_alpha) == (momentum, damping, alpha)
  assert args.poly_end_epoch > args.epochs  # so the seed's E = max(epoch, polynomial_epoch)
  assert isinstance(args.epochs, float) and isinstance(args.poly_power, float)


def test_without_config_the_defaults_are_unchanged():
  """No recipe regularization, the v1.5 model, the bs4k optimizer as before."""
  args = parse()
  assert args.config is None and args.arch == 'resnet50'
  assert (args.mixup_alpha, args.random_erasing, args.weight_norm_cap) == (0.0, 0.0, False)
  assert args.momentum_correction and not args.running_mixup
  assert (args.batch_size, args.acc_iters, args.epochs, args.lr, args.momentum) == (
      4096, 16, 35.0, 8.18e-3, 0.997)


def test_command_line_overrides_the_file():
  path = config(32_768)
  args = parse('--lr', '0.5', '--config', path, '--no-weight_norm_cap', '--random_erasing_area',
               '0.1', '0.2', '--arch', 'resnet50', '--acc_iters', '2', '--mixup_alpha', '0')
  assert args.config == path
  assert (args.lr, args.weight_norm_cap, args.random_erasing_area) == (0.5, False, [0.1, 0.2])
  assert (args.arch, args.acc_iters, args.mixup_alpha) == ('resnet50', 2, 0.0)
  assert (args.momentum, args.damping, args.batch_size) == (0.97, 2.0e-4, 32_768)  # the file's


def test_an_optimizer_default_does_not_override_the_file(tmp_path):
  path = tmp_path / 'sgd.toml'
  path.write_text('optimizer = "sgd"\nlr = 0.02\n')
  args = parse('--config', str(path))
  assert (args.optimizer, args.lr, args.momentum) == ('sgd', 0.02, 0.9)  # momentum: sgd's


@pytest.mark.parametrize('text, message', [
    ('learning_rate = 0.1', "unknown field 'learning_rate'"),
    ('momentun = 0.9', "unknown field 'momentun' (did you mean 'momentum'?)"),
    ('config = "other.toml"', "unknown field 'config'"),
    ('lr = "fast"', "field 'lr' must be a number, not 'fast'"),
    ('batch_size = 4096.0', "field 'batch_size' must be an integer, not 4096.0"),
    ('steps = true', "field 'steps' must be an integer, not True"),
    ('weight_norm_cap = 1', "field 'weight_norm_cap' must be true or false, not 1"),
    ('lr_schedule = "linear"', "field 'lr_schedule' must be one of 'constant', 'cosine', 'poly'"),
    ('random_erasing_area = [0.1]', "field 'random_erasing_area' must be a list of 2 values"),
    ('random_erasing_area = [0.1, "x"]', "field 'random_erasing_area' must be a list of 2"),
    ('[optimizer]\nlr = 0.1', "field 'optimizer' must be a string, not {'lr': 0.1}"),
    ('lr = ', 'Invalid value'),
])
def test_bad_config_is_an_error_naming_file_and_field(tmp_path, text, message):
  path = tmp_path / 'bad.toml'
  path.write_text(f'# a comment\nmomentum = 0.9\n{text}\n')
  with pytest.raises(SystemExit) as raised:
    parse('--config', str(path))
  assert str(raised.value).startswith(f'--config {path}: '), raised.value
  assert message in str(raised.value), raised.value


def test_missing_config_file_is_an_error(tmp_path):
  with pytest.raises(SystemExit, match='--config .*missing.toml: .*No such file'):
    parse('--config', str(tmp_path / 'missing.toml'))


def test_an_imagenet_config_is_not_for_cifar10():
  """`--arch` is a flag of the ImageNet example only: its configs fail elsewhere."""
  with pytest.raises(SystemExit, match="unknown field 'arch'"):
    _common.parse_args(cifar10.TASK, cifar10.__doc__, ['--config', config(4_096)])


def test_check_args_rejects_unknown_arch_and_recipe_values_out_of_range():
  base = ['--batch_size', '16', '--acc_iters', '1', '--eval_batch_size', '16']
  _common.check_args(parse(*base, '--arch', 'resnet50d'), imagenet.TASK, 2)
  for flags, message in [(['--arch', 'resnet51'], "--arch 'resnet51'"),
                         (['--mixup_alpha', '-1'], '--mixup_alpha'),
                         (['--random_erasing', '1.5'], '--random_erasing 1.5'),
                         (['--random_erasing_area', '0.3', '0.2'], '--random_erasing_area'),
                         (['--random_erasing_aspect', '0'], '--random_erasing_aspect')]:
    with pytest.raises(SystemExit, match=message):
      _common.check_args(parse(*base, *flags), imagenet.TASK, 2)


# ----------------------------------------------------------------------------- ResNet-50-D


def resnet50d_parameters(w: int, classes: int) -> int:
  """Counted from the seed's architecture: a stem of 3x3 convs 3 -> w/2 (with a bias) -> w/2 -> w,
  bottlenecks [3, 4, 6, 3] (1x1 to c, 3x3 c to c, 1x1 to 4c, c = w, 2w, 4w, 8w; a 1x1 conv
  shortcut in each stage's first block; pooling has no parameters), BatchNorm's scale and bias
  after every conv, a dense layer with a bias."""

  def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout

  def bn(c: int) -> int:  # scale and bias
    return 2 * c

  half = w // 2
  total = conv(3, 3, half) + half + bn(half) + conv(3, half, half) + bn(half)
  total += conv(3, half, w) + bn(w)
  cin = w
  for stage, blocks in enumerate((3, 4, 6, 3)):
    c = w * 2**stage
    for block in range(blocks):
      total += conv(1, cin, c) + bn(c) + conv(3, c, c) + bn(c) + conv(1, c, 4 * c) + bn(4 * c)
      if block == 0:
        total += conv(1, cin, 4 * c) + bn(4 * c)
      cin = 4 * c
  return total + cin * classes + classes


def shapes(model: nn.Module, image: int = 224, **kwargs):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image, image, 3)),
                                           train=False, **kwargs))


def count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_resnet50d_parameter_count():
  """25,576,296 = ResNet-50's 25,557,032 (torchvision's count; the v1.5 model here) + 19,264: the
  three-conv stem's 27 x 32 + 32 (bias) + 9 x 32 x 32 + 9 x 32 x 64 weights and 2 x 128
  BatchNorm parameters (28,800) instead of the 7x7 conv's 9,408 and 128 (9,536). The seed's
  "≈ 25.58 M" (facts 2.6)."""
  assert resnet50d_parameters(64, 1000) == 25_576_296
  d = shapes(imagenet.ResNet50D(64, 1000))
  assert count(d['params']) == 25_576_296
  assert count(shapes(imagenet.ResNet50(64, 1000))['params']) == 25_557_032
  assert count(shapes(imagenet.ResNet50D(8, 10), 32)['params']) == resnet50d_parameters(8, 10)
  scales = [path for path, _ in jax.tree_util.tree_leaves_with_path(d['params'])
            if path[-1].key == 'scale']
  assert len(scales) == 55 and len(jax.tree.leaves(d['batch_stats'])) == 2 * 55


def test_resnet50d_stem_and_shortcut_structure():
  """At --width 8: stem kernels 3x3x3x4 (+ bias), 3x3x4x4, 3x3x4x8; first blocks' 1x1 shortcut
  convs (stride 1) see the block input average-pooled 2x2/2 where the block is strided; the
  3x3/2 max-pool halves 16 to 8; strides sit on the stem's first conv and first blocks' 3x3."""
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, (nn.Conv, imagenet.BottleneckD)):
      calls.append((context.module.path, context.module, args[0].shape, out.shape))
    return out

  with nn.intercept_methods(record):
    params = shapes(imagenet.ResNet50D(8, 10), 32)['params']
  p = jax.tree.map(lambda leaf: leaf.shape, params)
  assert p['stem_conv1'] == {'kernel': (3, 3, 3, 4), 'bias': (4,)}
  assert p['stem_conv2'] == {'kernel': (3, 3, 4, 4)}
  assert p['stem_conv3'] == {'kernel': (3, 3, 4, 8)}
  assert p['fc'] == {'kernel': (4 * 8 * 8, 10), 'bias': (10,)}  # 4 x 8w channels
  assert sorted(k for k in params if k.startswith('res')) == sorted(
      f'res{s}_{b}' for s, n in zip(range(2, 6), (3, 4, 6, 3), strict=True) for b in range(n))
  for stage, cin in zip(range(2, 6), (8, 32, 64, 128), strict=True):
    c = 8 * 2 ** (stage - 2)
    assert p[f'res{stage}_0']['shortcut_conv'] == {'kernel': (1, 1, cin, 4 * c)}
    assert 'shortcut_conv' not in p[f'res{stage}_1']
  by_path = {'/'.join(path): (module, x, y) for path, module, x, y in calls}
  module, x, y = by_path['stem_conv1']
  assert module.strides == 2 and x[1:] == (32, 32, 3) and y[1:] == (16, 16, 4)
  assert by_path['res2_0'][1][1:3] == (8, 8)  # after the max-pool
  for stage, size in zip(range(2, 6), (8, 8, 4, 2), strict=True):
    block, block_in, block_out = by_path[f'res{stage}_0']
    shortcut, x, y = by_path[f'res{stage}_0/shortcut_conv']
    conv2 = by_path[f'res{stage}_0/conv2'][0]
    assert shortcut.strides == 1 and shortcut.kernel_size == (1, 1)
    assert block_in[1] == size and x[1] == block_out[1] == (size if stage == 2 else size // 2)
    assert block.strides == conv2.strides == (1 if stage == 2 else 2)


def test_resnet50d_shortcut_is_average_pool_then_conv():
  """The strided block's shortcut conv gets exactly the mean of each 2x2 patch of its input."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if context.module.name == 'shortcut_conv':
      seen['x'] = args[0]
    return next_fun(*args, **kwargs)

  block = imagenet.BottleneckD(4, 2)
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
  variables = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.5, leaf.dtype),
                           jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False)))

  def shortcut_input(variables, x):
    with nn.intercept_methods(record):
      block.apply(variables, x, train=False)
    return seen['x']

  pooled = np.asarray(x).reshape(2, 3, 2, 3, 2, 8).mean(axis=(2, 4))
  np.testing.assert_allclose(jax.jit(shortcut_input)(variables, x), pooled, rtol=1e-6, atol=1e-6)


def test_resnet50d_batch_norm_and_initializers():
  """Every one of the 55 BatchNorms (the residual branches' last too): decay 0.9 (flax's momentum
  has Chainer's meaning: running = 0.9 running + 0.1 batch), eps 2e-5, scale ~ N(1, 0.05), over
  the 'data' axis; every conv and the dense layer He-normal, fan-in, not truncated."""
  norms, kernels = [], []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      norms.append(context.module)
    elif isinstance(context.module, (nn.Conv, nn.Dense)):
      kernels.append(context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    shapes(imagenet.ResNet50D(8, 10), 32)
  assert len(norms) == 3 + 16 * 3 + 4 == 55 and len(kernels) == 3 + 16 * 3 + 4 + 1
  for bn in norms:
    assert (bn.momentum, bn.epsilon, bn.axis_name) == (0.9, 2e-5, _common.AXIS), bn.path
    assert bn.scale_init is imagenet.gamma_init and bn.use_scale and bn.use_bias
    assert bn.bias_init is nn.initializers.zeros
  for layer in kernels:
    assert layer.kernel_init is imagenet.he_normal, layer.path
  assert [layer.use_bias for layer in kernels].count(True) == 2  # stem_conv1 and fc

  gamma = np.asarray(imagenet.gamma_init(jax.random.key(2), (100_000,)))
  assert abs(gamma.mean() - 1.0) < 1e-3 and abs(gamma.std() - 0.05) < 1e-3
  for shape, fan_in in [((3, 3, 64, 128), 3 * 3 * 64), ((512, 160), 512)]:
    w = np.asarray(imagenet.he_normal(jax.random.key(3), shape))
    std = math.sqrt(2.0 / fan_in)
    assert abs(w.std() / std - 1) < 0.01 and abs(w.mean()) < 0.01 * std
    assert abs(np.mean(np.abs(w) > 2 * std) - 0.0455) < 0.003  # flax's he_normal: 0


def test_bad_flags_are_clear_errors(tmp_path):
  """A batch that does not split over the devices, more devices than exist, a missing image
  list, `--resume` without `--checkpoint_dir` or with nothing in it: SystemExit, saying why."""
  base = ['--data', 'synthetic', '--width', '4', '--image_size', '16', '--batch_size', '12']

  def error(*flags: str) -> str:
    args = _common.parse_args(cifar10.TASK, '', [*base, *flags])
    with pytest.raises(SystemExit) as info:
      _common.train(cifar10.TASK, args)
    return str(info.value)

  assert 'must be divisible by devices x acc_iters = 8' in error()
  assert '--num_devices 9: 8 devices available' in error('--num_devices', '9')
  missing = str(tmp_path / 'missing.txt')
  assert f'--train_list {missing}: no such file' in error(
      '--num_devices', '4', '--data', 'imagelist', '--train_list', missing, '--train_root',
      str(tmp_path), '--val_list', missing)
  assert '--data imagelist needs --val_list' in error(
      '--num_devices', '4', '--data', 'imagelist', '--train_list', missing, '--train_root',
      str(tmp_path))
  assert '--resume needs --checkpoint_dir' in error('--num_devices', '4', '--resume')
  assert 'no checkpoint in --checkpoint_dir' in error(
      '--num_devices', '4', '--resume', '--checkpoint_dir', str(tmp_path / 'none'))
