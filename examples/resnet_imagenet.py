"""Data-parallel K-FAC on ImageNet (224x224x3, 1000 classes): ResNet-50 with synchronized
BatchNorm, and optimizer defaults from chainerkfac's ImageNet recipe.

The model is ResNet-50 v1.5 (7x7/2 stem and 3x3/2 max-pool, bottleneck blocks [3, 4, 6, 3] of
`--width` x [1, 2, 4, 8] channels, 4x that out of each block, the stride on the 3x3 conv;
`--width 64` is the 25.6M-parameter model). BatchNorm normalizes over the global batch
(`axis_name='data'`). The batch is sharded over a 1-D device mesh axis 'data' (`jax.shard_map`,
parameters replicated); `kfax.kfac(table, axis_name='data')` averages the statistics over it and
splits the refreshes of ResNet-50's 54 layers across the devices. `--acc_iters k` accumulates k
micro-batches (gradients and statistics, `kfax.accumulate`) per update and communicates once.
Shared code: `examples/_common.py`.

Run:

    python examples/resnet_imagenet.py --data_dir ~/tensorflow_datasets   # imagenet2012 (tfds)
    python examples/resnet_imagenet.py --data synthetic --image_size 64 --width 16 \\
        --batch_size 256 --acc_iters 1 --steps 200                        # no download
    mpirun -np 8 python examples/resnet_imagenet.py --distributed         # 8 hosts or GPUs
    srun --ntasks 32 python examples/resnet_imagenet.py --distributed --acc_iters 4

With `--distributed`, `jax.distributed.initialize()` finds the coordinator itself; every process
loads its own slice of the global batch. `--data tfds` needs `pip install tensorflow
tensorflow-datasets` and ImageNet prepared for tfds (a manual download); its preprocessing is
only a resize to `--image_size`, random flips and per-channel standardization.

Defaults for K-FAC come from chainerkfac's 4,096-image ImageNet configuration, the "8 GPUs x
acc_iters 16" variant: 32 images per device on 8 devices, 16 micro-batches (github.com/tyohei/
chainerkfac, examples/imagenet/configs; Osawa et al., CVPR 2019; its README reports 75.9% top-1
after 35 epochs at this batch size, with ResNet-50-D and the parts below that this script
lacks): global batch 4096 with `--acc_iters 16`, 35 epochs, lr 8.18e-3 held for 1 epoch and then
`lr (1 - t/T)^11` to 0 at epoch 53, momentum 0.997, factored (π-corrected Tikhonov) damping
2.5e-4, empirical Fisher, fresh factors every step (`--ema_decay 0`, their `cov_ema_decay`
1.0) and refreshes every step (`--stats_every 1 --inverse_every 1`), no norm constraint and no
weight decay. Not reproduced: their ResNet-50-D, weight-norm capping at sqrt(2 d_out) (their
replacement for weight decay), the momentum correction lr_t / lr_{t-1}, running mixup, random
erasing and mean-image subtraction. No accuracy has been measured with this script. kfax's
cheaper periodic mode is e.g. `--stats_every 10 --inverse_every 100 --ema_decay 0.95`. SGD and
Adam (AdamW) defaults (lr 0.1 with momentum 0.9, and 1e-3, same schedule) are untuned.
"""

from __future__ import annotations

import os

os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # before numpy or jax load OpenBLAS

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

import _common

norm = _common.batch_norm  # synchronized over the 'data' axis


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BatchNorm; projection shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.relu(norm(train)(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
    y = nn.Conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), use_bias=False)(y)
    y = nn.relu(norm(train)(y))
    y = nn.Conv(4 * self.features, (1, 1), use_bias=False)(y)
    y = norm(train, scale_init=nn.initializers.zeros)(y)
    if x.shape[-1] != 4 * self.features or self.strides != 1:
      x = norm(train)(nn.Conv(4 * self.features, (1, 1), self.strides, use_bias=False)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """7x7/2 stem, 3x3/2 max-pool, bottlenecks [3, 4, 6, 3], mean pool, dense."""

  width: int = 64
  classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = nn.Conv(self.width, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False)(x)
    x = nn.relu(norm(train)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate((3, 4, 6, 3)):
      for block in range(blocks):
        x = Bottleneck(self.width * 2**stage, 2 if stage and not block else 1)(x, train)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def make_model(args: argparse.Namespace) -> nn.Module:
  return ResNet50(args.width, args.num_classes)


TASK = _common.Task(
    name='imagenet', tfds_name='imagenet2012', test_split='validation', image_size=224,
    channels=3, classes=1000, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), flip=True,
    make_model=make_model,
    # chainerkfac's bs4k "8gpu x 16" configuration (see the docstring).
    defaults={
        'width': 64, 'batch_size': 4096, 'acc_iters': 16, 'epochs': 35.0, 'lr_schedule': 'poly',
        'decay_start_epoch': 1.0, 'poly_power': 11.0, 'poly_end_epoch': 53.0, 'damping': 2.5e-4,
        'damping_mode': 'factored', 'norm_constraint': 0.0, 'ema_decay': 0.0, 'stats_every': 1,
        'inverse_every': 1, 'fisher': 'empirical', 'log_every': 20, 'eval_every': 2000},
    optimizer_defaults={'kfac': {'lr': 8.18e-3, 'momentum': 0.997},
                        'sgd': {'lr': 0.1, 'momentum': 0.9}, 'adam': {'lr': 1e-3}},
)

if __name__ == '__main__':
  _common.main(TASK, __doc__)
