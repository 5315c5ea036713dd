"""`kfax.summary` of an ImageNet ResNet-50 and of an lm1b-sized transformer LM, shape-only.

Writes benchmarks/results/summary_resnet50.txt and summary_transformer_lm.txt (the README quotes
their totals). Nothing is allocated: parameters and the layer table come from `jax.eval_shape`.

    python benchmarks/summaries.py
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

import kfax
from models import Bottleneck, ResNet

RESULTS = pathlib.Path(__file__).parent / 'results'


class DecoderBlock(nn.Module):
  """Pre-LayerNorm causal self-attention and MLP, as flax's lm1b example builds them."""

  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h, mask=mask)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.mlp)(h))), None


class TransformerLM(nn.Module):
  """Token and learned position embeddings, scanned decoder blocks, tied output embedding."""

  vocab: int = 30000
  width: int = 512
  heads: int = 8
  mlp: int = 2048
  layers: int = 6
  length: int = 256

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    embed = nn.Embed(self.vocab, self.width)
    position = self.param('position', nn.initializers.normal(0.02), (self.length, self.width))
    x = embed(tokens) + position[:tokens.shape[1]]
    blocks = nn.scan(nn.remat(DecoderBlock), variable_axes={'params': 0},
                     split_rngs={'params': True}, length=self.layers)
    x, _ = blocks(self.heads, self.mlp, name='decoder')(x, None)
    return embed.attend(nn.LayerNorm()(x))


def _resnet50() -> str:
  model = ResNet((3, 4, 6, 3), Bottleneck, 64, 1000, True)
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)

  def loss_fn(params, batch_stats, x, y):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                            mutable=['batch_stats'])
    return kfax.softmax_cross_entropy(logits, y)

  grad_fn = kfax.value_grad_and_stats(loss_fn)
  return kfax.summary(grad_fn.layers(variables['params'], variables['batch_stats'], x, y))


def _transformer() -> str:
  model = TransformerLM()
  tokens = jax.ShapeDtypeStruct((2, 256), jnp.int32)
  params = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)['params']

  def loss_fn(params, tokens):
    logits = model.apply({'params': params}, tokens)[:, :-1]
    return kfax.softmax_cross_entropy(logits, tokens[:, 1:], where=tokens[:, 1:] > 0)

  return kfax.summary(kfax.value_grad_and_stats(loss_fn).layers(params, tokens))


def main() -> None:
  RESULTS.mkdir(exist_ok=True)
  for name, make in (('resnet50', _resnet50), ('transformer_lm', _transformer)):
    text = make()
    (RESULTS / f'summary_{name}.txt').write_text(text + '\n')
    print(f'{name}: {text.splitlines()[-1]}')


if __name__ == '__main__':
  main()
