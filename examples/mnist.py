"""Data-parallel K-FAC on MNIST (28x28x1, 10 classes): a LeNet-style CNN, one device or many.

The model is chainerkfac's MNIST CNN (`--width 20`: conv 5x5 20, max-pool, conv 5x5 50,
max-pool, dense 500, dense 10). The batch is sharded over a 1-D device mesh axis 'data'
(`jax.shard_map`, parameters replicated); `kfax.kfac(table, axis_name='data')` averages the K-FAC
statistics over it and splits the refreshes across the devices. Statistics every
`--stats_every` steps, refreshes every `--inverse_every`; `--acc_iters k` accumulates k
micro-batches (gradients and statistics) per update. Shared code: `examples/_common.py`.

Run:

    python examples/mnist.py                          # all local devices, tensorflow_datasets
    python examples/mnist.py --data synthetic         # no download: learnable synthetic digits
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/mnist.py --num_devices 8
    python examples/mnist.py --optimizer adam --json adam.json     # for comparison
    mpirun -np 4 python examples/mnist.py --distributed            # one process per host/GPU
    srun --ntasks 4 python examples/mnist.py --distributed         # SLURM

With `--distributed`, `jax.distributed.initialize()` finds the coordinator itself; every process
loads its own slice of the global batch. `--data tfds` needs `pip install -e ".[tfds]"`
(TensorFlow Datasets).

Defaults: kfax's own (`kfax.kfac(table)`: factored damping 1e-4, norm constraint 1e-3, EMA 0.95,
refresh every 10 updates) with statistics every 5 steps, MC Fisher, SGD lr 0.1 and momentum 0.9:
the settings tuned on the digits CNN of `examples/digits.py`, not tuned on MNIST. SGD and Adam
(AdamW) use lr 0.03 (momentum 0.9) and 1e-3, untuned. Global batch 128, 5 epochs.
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


class LeNet(nn.Module):
  """Conv 5x5 `width` -> pool -> conv 5x5 2.5`width` -> pool -> dense 25`width` -> dense."""

  width: int = 20
  classes: int = 10
  dtype: Any = jnp.float32  # compute; parameters stay float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train  # no BatchNorm or dropout
    conv = partial(nn.Conv, padding='VALID', dtype=self.dtype)
    pool = lambda h: nn.max_pool(h, (2, 2), strides=(2, 2))
    x = pool(nn.relu(conv(self.width, (5, 5))(x)))
    x = pool(nn.relu(conv(self.width * 5 // 2, (5, 5))(x)))
    x = nn.relu(nn.Dense(self.width * 25, dtype=self.dtype)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.classes, dtype=self.dtype)(x).astype(jnp.float32)


def make_model(args: argparse.Namespace) -> nn.Module:
  return LeNet(args.width, args.num_classes, jnp.dtype(args.dtype))


TASK = _common.Task(
    name='mnist', tfds_name='mnist', test_split='test', image_size=28, channels=1, classes=10,
    mean=(0.1307,), std=(0.3081,), flip=False, make_model=make_model,
    defaults={'width': 20, 'batch_size': 128, 'epochs': 5.0, 'log_every': 100},
    optimizer_defaults={'kfac': {'lr': 0.1, 'momentum': 0.9},
                        'sgd': {'lr': 0.03, 'momentum': 0.9}, 'adam': {'lr': 1e-3}},
)

if __name__ == '__main__':
  _common.main(TASK, __doc__)
