"""Data-parallel K-FAC on CIFAR-10 (32x32x3, 10 classes): ResNet-18 with synchronized BatchNorm.

The model is the CIFAR-shape ResNet-18 (3x3 stem, no max-pool, basic blocks [2, 2, 2, 2] of
`--width` x [1, 2, 4, 8] channels; `--width 64` is the usual 11M-parameter model). BatchNorm
normalizes over the global batch (`axis_name='data'`) and its running statistics travel as the
`has_aux` output of `kfax.value_grad_and_stats`; K-FAC preconditions every conv and the
classifier, and BatchNorm's scales and offsets unit-wise. The batch is sharded over a 1-D
device mesh axis 'data' (`jax.shard_map`, parameters replicated), and `kfax.kfac(table,
axis_name='data')` averages the statistics and splits the refreshes across the devices. Shared code:
`examples/_common.py`.

Run:

    python examples/cifar10.py                        # all local devices, tensorflow_datasets
    python examples/cifar10.py --data synthetic       # no download: learnable synthetic images
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/cifar10.py --num_devices 8
    python examples/cifar10.py --optimizer sgd --json sgd.json     # for comparison
    python examples/cifar10.py --acc_iters 4 --batch_size 512      # 4 micro-batches per update
    mpirun -np 4 python examples/cifar10.py --distributed          # one process per host/GPU
    srun --ntasks 4 python examples/cifar10.py --distributed       # SLURM

With `--distributed`, `jax.distributed.initialize()` finds the coordinator itself; every process
loads its own slice of the global batch. `--data tfds` needs `pip install -e ".[tfds]"`
(TensorFlow Datasets); its preprocessing is per-channel standardization and random flips.

Defaults (untuned starting points, no accuracy claimed): kfax's own K-FAC settings
(`kfax.kfac(table)`: factored damping 1e-4, norm constraint 1e-3, EMA 0.95, refresh every 10
updates)
with statistics every 5 steps and MC Fisher, and the usual CIFAR SGD values: lr 0.1 with cosine
decay, momentum 0.9, weight decay 5e-4 on kernels, global batch 128, 20 epochs. Adam (AdamW)
uses lr 1e-3.
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


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm; identity, or a strided 1x1 conv + BatchNorm, shortcut."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32  # compute; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = partial(nn.Conv, use_bias=False, padding=((1, 1), (1, 1)), dtype=self.dtype)
    bn = partial(norm, train, dtype=self.dtype)
    y = nn.relu(bn()(conv(self.features, (3, 3), strides=self.strides)(x)))
    y = bn(scale_init=nn.initializers.zeros)(conv(self.features, (3, 3))(y))
    if x.shape[-1] != self.features or self.strides != 1:
      x = bn()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False, dtype=self.dtype)(x))
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """3x3 stem, blocks [2, 2, 2, 2] of `width` x [1, 2, 4, 8] channels, mean pool, dense."""

  width: int = 64
  classes: int = 10
  dtype: Any = jnp.float32  # compute; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype)(x)
    x = nn.relu(norm(train, dtype=self.dtype)(x))
    for stage in range(4):
      for block in range(2):
        x = BasicBlock(self.width * 2**stage, 2 if stage and not block else 1,
                       self.dtype)(x, train)
    logits = nn.Dense(self.classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
    return logits.astype(jnp.float32)


def make_model(args: argparse.Namespace) -> nn.Module:
  return ResNet18(args.width, args.num_classes, jnp.dtype(args.dtype))


TASK = _common.Task(
    name='cifar10', tfds_name='cifar10', test_split='test', image_size=32, channels=3,
    classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), flip=True,
    make_model=make_model,
    defaults={'width': 64, 'batch_size': 128, 'epochs': 20.0, 'lr_schedule': 'cosine',
                  'weight_decay': 5e-4, 'log_every': 100, 'eval_every': 1000},
    optimizer_defaults={'kfac': {'lr': 0.1, 'momentum': 0.9},
                        'sgd': {'lr': 0.1, 'momentum': 0.9}, 'adam': {'lr': 1e-3}},
)

if __name__ == '__main__':
  _common.main(TASK, __doc__)
