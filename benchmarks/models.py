"""Compact Flax models for the kfax benchmarks: an MLP, a small CNN and ResNet-18 / ResNet-50.

Every model takes `(x, train)`; the ResNets keep BatchNorm statistics in the `batch_stats`
collection (apply with `mutable=['batch_stats']` when training). `build(name, ...)` returns the
model and the shape of one input example, with CPU-sized defaults in `DEFAULTS`:

- `mlp`: flattened input -> `width` -> `width` -> classes (ReLU).
- `cnn`: three 3x3 convs (`width`, 2`width` stride 2, 4`width` stride 2), global mean pool, Dense.
- `resnet18`: CIFAR-shape ResNet-18 (3x3 stem, no max-pool, basic blocks [2, 2, 2, 2],
  channels `width`·[1, 2, 4, 8]); the paper's model has width 64.
- `resnet50`: ImageNet-shape ResNet-50 (7x7 stride-2 stem, 3x3 max-pool, bottleneck blocks
  [3, 4, 6, 3], channels `width`·[1, 2, 4, 8] and 4x that out of each block); width 64 is the
  paper's model.

Not a test dependency: nothing under `tests/` imports this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Size settings of one benchmark model."""

  batch: int
  image_size: int
  channels: int
  width: int
  classes: int


# CPU-sized defaults: each model's steps take well under a second on 2 cores.
DEFAULTS: dict[str, ModelConfig] = {
    'mlp': ModelConfig(batch=128, image_size=28, channels=1, width=512, classes=10),
    'cnn': ModelConfig(batch=64, image_size=32, channels=3, width=32, classes=10),
    'resnet18': ModelConfig(batch=32, image_size=32, channels=3, width=16, classes=10),
    'resnet50': ModelConfig(batch=8, image_size=64, channels=3, width=16, classes=1000),
}


class MLP(nn.Module):
  """Two hidden ReLU layers of `width` units."""

  width: int
  classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(self.classes)(x)


class SmallCNN(nn.Module):
  """3x3 convs of `width`, 2·`width` (stride 2) and 4·`width` (stride 2), mean pool, Dense."""

  width: int
  classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train
    x = nn.relu(nn.Conv(self.width, (3, 3))(x))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(4 * self.width, (3, 3), strides=2)(x))
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def _norm(train: bool, **kwargs) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, **kwargs)


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm, identity or 1x1-projection shortcut (ResNet-18/34)."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = partial(nn.Conv, use_bias=False, padding=((1, 1), (1, 1)))
    y = conv(self.features, (3, 3), strides=self.strides)(x)
    y = nn.relu(_norm(train)(y))
    y = conv(self.features, (3, 3))(y)
    y = _norm(train, scale_init=nn.initializers.zeros)(y)
    return nn.relu(_shortcut(x, y.shape[-1], self.strides, train) + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with BatchNorm (ResNet-50/101/152)."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.Conv(self.features, (1, 1), use_bias=False)(x)
    y = nn.relu(_norm(train)(y))
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)),
                use_bias=False)(y)
    y = nn.relu(_norm(train)(y))
    y = nn.Conv(4 * self.features, (1, 1), use_bias=False)(y)
    y = _norm(train, scale_init=nn.initializers.zeros)(y)
    return nn.relu(_shortcut(x, y.shape[-1], self.strides, train) + y)


def _shortcut(x: jax.Array, features: int, strides: int, train: bool) -> jax.Array:
  """Identity, or a strided 1x1 conv with BatchNorm when the shape changes."""
  if x.shape[-1] == features and strides == 1:
    return x
  x = nn.Conv(features, (1, 1), strides=strides, use_bias=False)(x)
  return _norm(train)(x)


class ResNet(nn.Module):
  """ResNet with a CIFAR (3x3, no pool) or ImageNet (7x7/2 + max-pool) stem."""

  stage_sizes: Sequence[int]
  block: type[nn.Module]
  width: int
  classes: int
  imagenet_stem: bool

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if self.imagenet_stem:
      x = nn.Conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False)(x)
    else:
      x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
    x = nn.relu(_norm(train)(x))
    if self.imagenet_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = self.block(self.width * 2**stage, strides)(x, train)
    return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def build(name: str, config: ModelConfig) -> tuple[nn.Module, tuple[int, ...]]:
  """The model called `name` and the shape of one input example (H, W, C)."""
  example = (config.image_size, config.image_size, config.channels)
  if name == 'mlp':
    return MLP(config.width, config.classes), example
  if name == 'cnn':
    return SmallCNN(config.width, config.classes), example
  if name == 'resnet18':
    return ResNet((2, 2, 2, 2), BasicBlock, config.width, config.classes, False), example
  if name == 'resnet50':
    return ResNet((3, 4, 6, 3), Bottleneck, config.width, config.classes, True), example
  raise ValueError(f'unknown model {name!r}; choose from {sorted(DEFAULTS)}')


def init(model: nn.Module, example_shape: tuple[int, ...], seed: int = 0) -> tuple[dict, dict]:
  """(params, batch_stats) of `model`; batch_stats is {} for models without BatchNorm."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *example_shape)), train=False)
  return variables['params'], variables.get('batch_stats', {})
