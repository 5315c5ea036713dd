"""Compact Flax models for the kfax benchmarks: an MLP, a small CNN, ResNet-18 / ResNet-50 and a
causal transformer LM.

Every model takes `(x, train)`; the ResNets keep BatchNorm statistics in the `batch_stats`
collection (apply with `mutable=['batch_stats']` when training). `build(name, config, dtype)`
returns the model and the shape of one input example, with CPU-sized defaults in `DEFAULTS` and
the sizes of the GPU run (`gpu.sh`) in `GPU`; `random_batch` gives a fixed batch of inputs and
integer labels:

- `mlp`: flattened input -> `width` -> `width` -> classes (ReLU).
- `cnn`: three 3x3 convs (`width`, 2`width` stride 2, 4`width` stride 2), global mean pool, Dense.
- `resnet18`: CIFAR-shape ResNet-18 (3x3 stem, no max-pool, basic blocks [2, 2, 2, 2],
  channels `width`·[1, 2, 4, 8]); the paper's model has width 64.
- `resnet50`: ImageNet-shape ResNet-50 (7x7 stride-2 stem, 3x3 max-pool, bottleneck blocks
  [3, 4, 6, 3], channels `width`·[1, 2, 4, 8] and 4x that out of each block); width 64 is the
  paper's model.
- `transformer`: a causal transformer LM: token embedding plus learned positions, `depth`
  pre-LayerNorm blocks (`heads`-head `nn.MultiHeadDotProductAttention` with a causal mask, a GELU
  MLP of 4·`width`), a final LayerNorm and logits from the tied `Embed.attend`. Its input is
  `seq_len` int32 tokens of a vocabulary of `classes`, its labels the next token at every
  position. `GPU['transformer']` is the lm1b-sized model of `summaries.py` (vocabulary 30000,
  width 512, 8 heads, depth 6, 256 tokens).

`dtype` is the compute dtype (`'float32'` or `'bfloat16'`): every Conv, Dense, attention, Embed
and norm computes in it, the parameters stay float32 and the logits are cast to float32.

Not a test dependency: nothing under `tests/` imports this file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class ModelConfig:
  """Size settings of one benchmark model; fields a model does not use are None."""

  batch: int
  image_size: int | None = None  # images: height = width
  channels: int | None = None  # images: input channels
  width: int  # hidden units, base channels, or the LM's model width
  classes: int  # classes, or the LM's vocabulary
  seq_len: int | None = None  # LM: tokens per sequence
  depth: int | None = None  # LM: transformer blocks
  heads: int | None = None  # LM: attention heads

  def asdict(self) -> dict[str, int]:
    """The fields the model uses (an image model's dict has no LM fields, and vice versa)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

  def __repr__(self) -> str:
    return f'ModelConfig({", ".join(f"{k}={v}" for k, v in self.asdict().items())})'


# CPU-sized defaults: each model's steps take well under a second on 2 cores.
DEFAULTS: dict[str, ModelConfig] = {
    'mlp': ModelConfig(batch=128, image_size=28, channels=1, width=512, classes=10),
    'cnn': ModelConfig(batch=64, image_size=32, channels=3, width=32, classes=10),
    'resnet18': ModelConfig(batch=32, image_size=32, channels=3, width=16, classes=10),
    'resnet50': ModelConfig(batch=8, image_size=64, channels=3, width=16, classes=1000),
    'transformer': ModelConfig(batch=16, seq_len=64, width=128, depth=2, heads=4, classes=256),
}

# The sizes of the one-GPU run (gpu.sh): the paper's ResNet-50 at batch 128, and the
# lm1b-sized LM of summaries.py at 32 sequences of 256 tokens.
GPU: dict[str, ModelConfig] = {
    'resnet50': ModelConfig(batch=128, image_size=224, channels=3, width=64, classes=1000),
    'transformer': ModelConfig(batch=32, seq_len=256, width=512, depth=6, heads=8,
                               classes=30000),
}

DTYPES = ('float32', 'bfloat16')


class MLP(nn.Module):
  """Two hidden ReLU layers of `width` units."""

  width: int
  classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train
    dense = partial(nn.Dense, dtype=self.dtype)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(dense(self.width)(x))
    x = nn.relu(dense(self.width)(x))
    return dense(self.classes)(x).astype(jnp.float32)


class SmallCNN(nn.Module):
  """3x3 convs of `width`, 2·`width` (stride 2) and 4·`width` (stride 2), mean pool, Dense."""

  width: int
  classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train
    conv = partial(nn.Conv, dtype=self.dtype)
    x = nn.relu(conv(self.width, (3, 3))(x))
    x = nn.relu(conv(2 * self.width, (3, 3), strides=2)(x))
    x = nn.relu(conv(4 * self.width, (3, 3), strides=2)(x))
    return nn.Dense(self.classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


def _norm(train: bool, dtype: Any, **kwargs) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      **kwargs)


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm, identity or 1x1-projection shortcut (ResNet-18/34)."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = partial(nn.Conv, use_bias=False, padding=((1, 1), (1, 1)), dtype=self.dtype)
    y = conv(self.features, (3, 3), strides=self.strides)(x)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = conv(self.features, (3, 3))(y)
    y = _norm(train, self.dtype, scale_init=nn.initializers.zeros)(y)
    return nn.relu(_shortcut(x, y.shape[-1], self.strides, train, self.dtype) + y)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with BatchNorm (ResNet-50/101/152)."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.features, (1, 1))(x)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = conv(self.features, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)))(y)
    y = nn.relu(_norm(train, self.dtype)(y))
    y = conv(4 * self.features, (1, 1))(y)
    y = _norm(train, self.dtype, scale_init=nn.initializers.zeros)(y)
    return nn.relu(_shortcut(x, y.shape[-1], self.strides, train, self.dtype) + y)


def _shortcut(x: jax.Array, features: int, strides: int, train: bool, dtype: Any) -> jax.Array:
  """Identity, or a strided 1x1 conv with BatchNorm when the shape changes."""
  if x.shape[-1] == features and strides == 1:
    return x
  x = nn.Conv(features, (1, 1), strides=strides, use_bias=False, dtype=dtype)(x)
  return _norm(train, dtype)(x)


class ResNet(nn.Module):
  """ResNet with a CIFAR (3x3, no pool) or ImageNet (7x7/2 + max-pool) stem."""

  stage_sizes: Sequence[int]
  block: type[nn.Module]
  width: int
  classes: int
  imagenet_stem: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv = partial(nn.Conv, self.width, use_bias=False, dtype=self.dtype)
    if self.imagenet_stem:
      x = conv((7, 7), strides=2, padding=((3, 3), (3, 3)))(x)
    else:
      x = conv((3, 3), padding=((1, 1), (1, 1)))(x)
    x = nn.relu(_norm(train, self.dtype)(x))
    if self.imagenet_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = self.block(self.width * 2**stage, strides, dtype=self.dtype)(x, train)
    logits = nn.Dense(self.classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))
    return logits.astype(jnp.float32)


class DecoderBlock(nn.Module):
  """Pre-LayerNorm causal self-attention and a GELU MLP of 4x the width, both residual."""

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    width = x.shape[-1]
    h = nn.LayerNorm(dtype=self.dtype)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype)(h, h,
                                                                                    mask=mask)
    h = nn.LayerNorm(dtype=self.dtype)(x)
    h = nn.gelu(nn.Dense(4 * width, dtype=self.dtype, name='up')(h))
    return x + nn.Dense(width, dtype=self.dtype, name='down')(h)


class TransformerLM(nn.Module):
  """Causal LM: token and learned position embeddings, decoder blocks, tied output (attend)."""

  vocab: int
  seq_len: int
  width: int
  depth: int
  heads: int
  dtype: Any = jnp.float32
  input_dtype: ClassVar[Any] = jnp.int32  # tokens (init builds its dummy input of this dtype)

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = True) -> jax.Array:
    del train
    embed = nn.Embed(self.vocab, self.width, dtype=self.dtype)
    position = self.param('position', nn.initializers.normal(0.02), (self.seq_len, self.width))
    x = embed(tokens) + position[:tokens.shape[-1]].astype(self.dtype)
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      x = DecoderBlock(self.heads, self.dtype)(x, mask)
    return embed.attend(nn.LayerNorm(dtype=self.dtype)(x)).astype(jnp.float32)


def build(name: str, config: ModelConfig,
          dtype: str = 'float32') -> tuple[nn.Module, tuple[int, ...]]:
  """The model called `name`, computing in `dtype`, and the shape of one input example ((H, W,
  C) for images, (seq_len,) for the LM)."""
  dt = jnp.dtype(dtype)
  if name == 'transformer':
    model = TransformerLM(config.classes, config.seq_len, config.width, config.depth,
                          config.heads, dt)
    return model, (config.seq_len,)
  example = (config.image_size, config.image_size, config.channels)
  if name == 'mlp':
    return MLP(config.width, config.classes, dt), example
  if name == 'cnn':
    return SmallCNN(config.width, config.classes, dt), example
  if name == 'resnet18':
    return ResNet((2, 2, 2, 2), BasicBlock, config.width, config.classes, False, dt), example
  if name == 'resnet50':
    return ResNet((3, 4, 6, 3), Bottleneck, config.width, config.classes, True, dt), example
  raise ValueError(f'unknown model {name!r}; choose from {sorted(DEFAULTS)}')


def input_dtype(model: nn.Module) -> Any:
  """The dtype of the model's input: int32 tokens for the LM, float32 images otherwise."""
  return getattr(model, 'input_dtype', jnp.float32)


def init(model: nn.Module, example_shape: tuple[int, ...], seed: int = 0) -> tuple[dict, dict]:
  """(params, batch_stats) of `model` (float32); batch_stats is {} for models without
  BatchNorm. Jitted, so that a large model on a GPU does not compile op by op."""
  x = jnp.zeros((1, *example_shape), input_dtype(model))
  variables = jax.jit(partial(model.init, train=False))(jax.random.key(seed), x)
  return variables['params'], variables.get('batch_stats', {})


def random_batch(name: str, config: ModelConfig, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A fixed random batch (x, y): normal images and class labels, or for the LM random tokens
  and, at every position, the next token."""
  kx, ky = jax.random.split(key)
  if name == 'transformer':
    tokens = jax.random.randint(kx, (config.batch, config.seq_len + 1), 0, config.classes)
    return tokens[:, :-1], tokens[:, 1:]
  _, example = build(name, config)
  x = jax.random.normal(kx, (config.batch, *example), jnp.float32)
  y = jax.random.randint(ky, (config.batch,), 0, config.classes)
  return x, y


def batch_shapes(name: str, config: ModelConfig) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes and dtypes of `random_batch`'s (x, y), without making them."""
  return jax.eval_shape(lambda k: random_batch(name, config, k), jax.random.key(0))


# ------------------------------------------------- small models of race.py and coverage.py


class Block(nn.Module):
  """Pre-LayerNorm transformer block: causal self-attention, then a GELU MLP, both residual."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * self.width, name='up')(h)
    return x + nn.Dense(self.width, name='down')(nn.gelu(h))


class TinyLM(nn.Module):
  """Causal transformer LM with learned positions and a tied output layer (`Embed.attend`)."""

  vocab: int
  length: int
  width: int = 32
  depth: int = 2
  heads: int = 2

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    embed = nn.Embed(self.vocab, self.width)
    pos = self.param('pos', nn.initializers.normal(0.02), (self.length, self.width))
    x = embed(tokens) + pos[:tokens.shape[-1]]
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      x = Block(self.width, self.heads)(x, mask)
    return embed.attend(nn.LayerNorm()(x))


class ResBlock(nn.Module):
  """conv-BN-ReLU-conv-BN plus the input (a 1x1 conv+BN projection where the shape changes)."""

  channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    h = nn.Conv(self.channels, (3, 3), self.stride, use_bias=False)(x)
    h = nn.relu(norm()(h))
    h = norm()(nn.Conv(self.channels, (3, 3), use_bias=False)(h))
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = norm()(nn.Conv(self.channels, (1, 1), self.stride, use_bias=False)(x))
    return nn.relu(x + h)


class DigitsResNet(nn.Module):
  """Stem conv 16 + BN, blocks 16, 32 (stride 2), 32, global average pool, Dense."""

  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(16, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = ResBlock(16)(x, train)
    x = ResBlock(32, 2)(x, train)
    x = ResBlock(32)(x, train)
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))
