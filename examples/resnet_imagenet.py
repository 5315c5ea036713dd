"""Data-parallel K-FAC on ImageNet (224x224x3, 1000 classes): ResNet-50 v1.5 or chainerkfac's
ResNet-50-D with synchronized BatchNorm, and optimizer defaults from chainerkfac's ImageNet recipe;
`--config` loads one of the recipe's six configurations.

Models (`--arch`; `--width w` scales every stage: bottlenecks of w x [1, 2, 4, 8] channels, 4x that
out of each block; `--width 64` is the full model):
- `resnet50` (the default): v1.5, a 7x7/2 stem and 3x3/2 max-pool, bottleneck blocks [3, 4, 6, 3]
  with the stride on the 3x3 conv and a strided 1x1 conv shortcut, each residual branch's last
  BatchNorm scale initialized to 0 (flax's initializers otherwise); 25,557,032 parameters.
- `resnet50d`: the seed's ResNet-50-D (He et al., "Bag of Tricks", 2019; github.com/tyohei/
  chainerkfac, examples/imagenet/models/resnet50_d.py): a stem of three 3x3 convs (w/2 with
  stride 2 and a bias, w/2, w) before the max-pool; when strided, the shortcut is a 2x2/2 average
  pool, then the 1x1 conv; BatchNorm decay 0.9 and eps 2e-5 with every scale initialized
  N(1, 0.05); untruncated He-normal (fan-in) conv and dense kernels; 25,576,296 parameters.

BatchNorm normalizes over the global batch (`axis_name='data'`). The batch is sharded over a 1-D
device mesh axis 'data' (`jax.shard_map`, parameters replicated); `kfax.kfac(table,
axis_name='data')` averages the statistics over it and splits the refreshes of the 54 conv and
dense layers (56 in ResNet-50-D) across the devices. `--acc_iters k` accumulates k micro-batches
(gradients and statistics, `kfax.accumulate`) per update and communicates once. Shared code:
`examples/_common.py`.

Run:

    python examples/resnet_imagenet.py --data_dir ~/tensorflow_datasets   # imagenet2012 (tfds)
    python examples/resnet_imagenet.py --config examples/configs/imagenet_bs32k.toml
    python examples/resnet_imagenet.py --data synthetic --image_size 64 --width 16 \\
        --batch_size 256 --acc_iters 1 --steps 200                        # no download
    mpirun -np 8 python examples/resnet_imagenet.py --distributed         # 8 hosts or GPUs
    srun --ntasks 32 python examples/resnet_imagenet.py --distributed --acc_iters 4

With `--distributed`, `jax.distributed.initialize()` finds the coordinator itself; every process
loads its own slice of the global batch. `--data tfds` needs `pip install -e ".[tfds]"`
(TensorFlow Datasets) and ImageNet prepared for tfds (a manual download); its preprocessing is
only a resize to `--image_size`, random flips and per-channel standardization.

`examples/configs/imagenet_bs{4k,8k,16k,32k,64k,128k}.toml` are the seed's six ImageNet
configurations (global batch 4,096 to 131,072; github.com/tyohei/chainerkfac, examples/imagenet/
configs; Osawa et al., CVPR 2019), every value with its source; flags on the command line
override the file. Their README reports 75.0% to 76.9% top-1 with them.

Without `--config`, the defaults for K-FAC come from the 4,096-image configuration, the "8 GPUs x
acc_iters 16" variant: 32 images per device on 8 devices, 16 micro-batches (its README reports
75.9% top-1 after 35 epochs): global batch 4096 with `--acc_iters 16`, 35 epochs, lr 8.18e-3
held for 1 epoch and then `lr (1 - t/T)^11` to 0 at epoch 53, momentum 0.997, factored
(π-corrected Tikhonov) damping 2.5e-4, empirical Fisher, fresh factors every step
(`--ema_decay 0`, their `cov_ema_decay` 1.0) and refreshes every step (`--stats_every 1
--inverse_every 1`), no norm constraint and no weight decay; but the v1.5 model and none of the
regularization below. The seed's momentum correction (momentum x lr_t / lr_{t-1} as the
learning rate falls) needs nothing: with its learning rate inside the velocity, that is optax's
momentum with the learning rate outside (`--momentum_correction`, on by default). Its
weight-norm capping at sqrt(2 d_out) (its replacement for weight decay), running mixup with the
previous micro-batch and random erasing are applied when their flags, which the configs set,
are on (`--weight_norm_cap`, `--mixup_alpha`, `--running_mixup`, `--random_erasing*`; see
`examples/_common.py`). `--data imagelist --train_list ... --train_root ... --val_list ...` reads
the seed's image lists with its mean subtraction (`--mean_file`, its mean.npy) and random crops
(`examples/_data.py`). Not reproduced: its BatchNorm over each GPU's 32 images
(here over the global micro-batch), and its full 2C x 2C BatchNorm Fisher blocks (kfax's are
unit-wise 2x2). No accuracy has been measured with this script. kfax's cheaper periodic mode is
e.g. `--stats_every 10 --inverse_every 100 --ema_decay 0.95`. SGD and Adam (AdamW) defaults (lr
0.1 with momentum 0.9, and 1e-3, same schedule) are untuned.
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import _common

norm = _common.batch_norm  # synchronized over the 'data' axis


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BatchNorm; projection shortcut."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32  # compute; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
    bn = partial(norm, train, dtype=self.dtype)
    y = nn.relu(bn()(conv(self.features, (1, 1))(x)))
    y = conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)))(y)
    y = nn.relu(bn()(y))
    y = conv(4 * self.features, (1, 1))(y)
    y = bn(scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != 4 * self.features or self.strides != 1:
      x = bn()(conv(4 * self.features, (1, 1), self.strides)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """7x7/2 stem, 3x3/2 max-pool, bottlenecks [3, 4, 6, 3], mean pool, dense."""

  width: int = 64
  classes: int = 1000
  dtype: Any = jnp.float32  # compute; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = nn.Conv(self.width, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype)(x)
    x = nn.relu(norm(train, dtype=self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate((3, 4, 6, 3)):
      for block in range(blocks):
        x = Bottleneck(self.width * 2**stage, 2 if stage and not block else 1,
                       self.dtype)(x, train)
    logits = nn.Dense(self.classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
    return logits.astype(jnp.float32)


# ResNet-50-D as chainerkfac builds it (examples/imagenet/models/resnet50_d.py there).

# Chainer's HeNormal: normal with standard deviation sqrt(2 / fan_in), fan_in = in channels x
# kernel area; not truncated (flax's he_normal is). The seed's dense kernel is the same.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def gamma_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
  """Every BatchNorm's scale ~ N(1, 0.05) (the seed's `NormalM`), the residual branch's last too."""
  return 1.0 + 0.05 * jax.random.normal(key, shape, dtype)


def norm_d(train: bool, name: str, dtype: Any = jnp.float32) -> nn.BatchNorm:
  """The seed's BatchNorm (decay 0.9, eps 2e-5, scale N(1, 0.05), bias 0), synchronized over
  'data' like `norm`."""
  return norm(train, momentum=0.9, epsilon=2e-5, scale_init=gamma_init, name=name, dtype=dtype)


def conv_d(features: int, kernel: int, strides: int, name: str, bias: bool = False,
           dtype: Any = jnp.float32) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides, padding=((pad, pad), (pad, pad)),
                 use_bias=bias, kernel_init=he_normal, name=name, dtype=dtype)


class BottleneckD(nn.Module):
  """As `Bottleneck` (stride on the 3x3), but with the seed's BatchNorm and init (no zero scale),
  and the "D" shortcut: when strided, a 2x2/2 average pool, then the 1x1 conv (stride 1)."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32  # compute; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = partial(norm_d, train, dtype=self.dtype)
    conv = partial(conv_d, dtype=self.dtype)
    y = nn.relu(bn('bn1')(conv(self.features, 1, 1, 'conv1')(x)))
    y = nn.relu(bn('bn2')(conv(self.features, 3, self.strides, 'conv2')(y)))
    y = bn('bn3')(conv(4 * self.features, 1, 1, 'conv3')(y))
    if x.shape[-1] != 4 * self.features or self.strides != 1:
      if self.strides != 1:
        x = nn.avg_pool(x, (2, 2), (self.strides, self.strides))
      x = bn('shortcut_bn')(conv(4 * self.features, 1, 1, 'shortcut_conv')(x))
    return nn.relu(x + y)


class ResNet50D(nn.Module):
  """Stem of three 3x3 convs (`width` / 2 with stride 2 and a bias, `width` / 2, `width`), each
  with BatchNorm and ReLU; 3x3/2 max-pool; `BottleneckD`s [3, 4, 6, 3]; mean pool; dense."""

  width: int = 64
  classes: int = 1000
  dtype: Any = jnp.float32  # compute; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    stem = max(self.width // 2, 1)
    for i, (features, strides) in enumerate(((stem, 2), (stem, 1), (self.width, 1)), 1):
      x = conv_d(features, 3, strides, f'stem_conv{i}', bias=i == 1, dtype=self.dtype)(x)
      x = nn.relu(norm_d(train, f'stem_bn{i}', self.dtype)(x))
    # Chainer's max_pooling_2d (pad 0, cover_all): the last window may run past the edge.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)))
    for stage, blocks in enumerate((3, 4, 6, 3)):
      for block in range(blocks):
        x = BottleneckD(self.width * 2**stage, 2 if stage and not block else 1, self.dtype,
                        name=f'res{stage + 2}_{block}')(x, train)
    logits = nn.Dense(self.classes, kernel_init=he_normal, name='fc',
                      dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
    return logits.astype(jnp.float32)


ARCHS = {'resnet50': ResNet50, 'resnet50d': ResNet50D}


def make_model(args: argparse.Namespace) -> nn.Module:
  if args.arch not in ARCHS:
    raise SystemExit(f'--arch {args.arch!r}: choose one of {", ".join(ARCHS)}.')
  return ARCHS[args.arch](args.width, args.num_classes, jnp.dtype(args.dtype))


TASK = _common.Task(
    name='imagenet', tfds_name='imagenet2012', test_split='validation', image_size=224,
    channels=3, classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), flip=True,
    make_model=make_model,
    # chainerkfac's bs4k "8gpu x 16" configuration's optimizer, the v1.5 model (see the docstring).
    defaults={
        'arch': 'resnet50', 'width': 64, 'batch_size': 4096, 'acc_iters': 16, 'epochs': 35.0,
        'lr_schedule': 'poly', 'decay_start_epoch': 1.0, 'poly_power': 11.0, 'poly_end_epoch': 53.0,
        'damping': 2.5e-4, 'damping_mode': 'factored', 'norm_constraint': 0.0, 'ema_decay': 0.0,
        'stats_every': 1, 'inverse_every': 1, 'fisher': 'empirical', 'log_every': 20,
        'eval_every': 2000},
    optimizer_defaults={'kfac': {'lr': 8.18e-3, 'momentum': 0.997},
                        'sgd': {'lr': 0.1, 'momentum': 0.9}, 'adam': {'lr': 1e-3}},
)

if __name__ == '__main__':
  _common.main(TASK, __doc__)
