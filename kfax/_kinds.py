"""Layer kinds: the one table of what kfax captures in a Flax model, and how.

A kind says which modules it matches (`match`), what each call saves for the statistics
(`save`), how a call's saved values and output gradient give its statistics (`statistics`), and
how its parameters form the matrix its curvature acts on (`Spec.layout`). Capture, the state,
preconditioning and `kfax.summary` all read this table; nothing else knows a Flax class.

Conventions, for a call with rows `m` (the positions the weights are shared over: every leading
axis of a Dense input, every output position of a conv), per-row input `a` (with a trailing 1
for a bias) and output gradient `dy = dL/dy` of a loss that is a mean over `N` examples:

- Kronecker kinds, `sequence="expand"` (positions are examples; K-FAC-expand):
  `A = (1/M) Σ_m a aᵀ`, `G = N Σ_m dy dyᵀ`, so `A ⊗ G = (1/N) Σ_m (a aᵀ) ⊗ (ĝ ĝᵀ)` for one row per
  example, `ĝ = N dy` being the row's gradient of its example's loss.
- Kronecker kinds, `sequence="reduce"` (positions summed per example; K-FAC-reduce): with `ā_e`
  the mean of example `e`'s rows and `s_e` the sum of its output gradients,
  `A = (1/E) Σ_e ā ā ᵀ`, `G = N Σ_e s sᵀ`.
- Unit-wise kinds (norms; SP-NGD): per channel `c` the Fisher of `(scale_c, bias_c)`,
  `F_c = N Σ [u v]ᵀ[u v]` with `u = Σ dy x̂`, `v = Σ dy` summed per row (expand) or per example
  (reduce), `x̂` the normalized input recomputed by the module itself without scale and bias.

`N` is applied after the pass (`_capture.py`) since it is known only once the loss has run.
A module called several times adds its `A` (and unit-wise) terms and averages its `G` terms.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

_LETTERS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'

# The oldest flax kfax is tested with (and the first whose nnx has everything the table names).
MIN_FLAX = (0, 12, 6)


def _version(v: str) -> tuple[int, ...]:
  return tuple(int(''.join(c for c in part if c.isdigit()) or 0) for part in v.split('.')[:3])


if _version(flax.__version__) < MIN_FLAX:
  raise ImportError(f'kfax needs flax >= {".".join(map(str, MIN_FLAX))}, found'
                    f' {flax.__version__}: pip install -U "flax>=0.12.6".')


class Reshape(NamedTuple):
  """A parameter as matrix blocks: reshape to `pre`, transpose by `perm`, reshape to `out`."""

  pre: tuple[int, ...]
  perm: tuple[int, ...]
  out: tuple[int, ...]

  def forward(self, x: jax.Array, stack: tuple[int, ...]) -> jax.Array:
    s = len(stack)
    x = x.reshape(stack + self.pre).transpose(tuple(range(s)) + tuple(p + s for p in self.perm))
    return x.reshape(stack + self.out)

  def backward(self, x: jax.Array, stack: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    s = len(stack)
    x = x.reshape(stack + tuple(self.pre[p] for p in self.perm))
    x = x.transpose(tuple(range(s)) + tuple(int(i) + s for i in np.argsort(self.perm)))
    return x.reshape(stack + shape)


class Spec(NamedTuple):
  """What one call of a matched module is, statically (hashable)."""

  kind: str  # 'dense', 'conv', 'embed' or 'norm'
  role: str  # 'apply', or 'lookup' / 'attend' for an Embed
  params: tuple[str, ...]  # the module's parameters this call uses
  shapes: tuple[tuple[int, ...], ...]  # their per-call shapes
  curvature: str  # 'kronecker' or 'unitwise'
  blocks: int  # independent Kronecker blocks of one call (groups, DenseGeneral batch_dims)
  dims: tuple[int, int]  # Kronecker: (A side, G side); unit-wise: (channels, parameters)
  layout: tuple[Reshape, ...]  # per parameter, how it becomes (blocks, rows, cols) / (C, 1)
  n_scaled: tuple[bool, bool]  # which statistic sides the loss's N multiplies
  config: Any = None  # kind-specific static data for `statistics`


class Unsupported(NamedTuple):
  """A module of a known kind in a setting capture cannot describe: the fallback, with why."""

  reason: str


Match = Spec | Unsupported | None


def _f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class Rows(NamedTuple):
  """How a call's rows make its statistics: `reduce` (K-FAC-reduce: an example's positions
  summed first), `stride` (only every `stride`-th example, `value_grad_and_stats(subsample=)`),
  `positions` (only every `positions`-th position of each example, expand only;
  `subsample_positions=`) and `dtype` (the rows rounded to it before their products, which
  still accumulate in float32; `stats_dtype=`; None: as the layer computes them)."""

  reduce: bool = False
  stride: int = 1
  positions: int = 1
  dtype: np.dtype | None = None


def every(stride: int, *xs: jax.Array) -> tuple[tuple[jax.Array, ...], float]:
  """Every `stride`-th example (leading axis) of each array, and `E / E_kept`: the factor that
  keeps a sum over the examples an unbiased estimate of the whole batch's."""
  if stride == 1:
    return xs, 1.0
  kept = tuple(x[::stride] for x in xs)
  return kept, xs[0].shape[0] / kept[0].shape[0]


def _with_ones(a: jax.Array) -> jax.Array:
  return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def kronecker_terms(
    a: jax.Array, dy: jax.Array, rows: Rows, diag: tuple[bool, bool], scale: float = 1.0
) -> dict[str, jax.Array]:
  """A and (unscaled) G of rows `a` `(E, R, B, d_a)` and `dy` `(E, R, B, d_g)`: E examples of R
  positions each, B blocks. Expand treats all E*R rows as examples; reduce averages `a` and sums
  `dy` over each example's positions first. A diagonal side keeps only its diagonal. G, a sum
  over examples, is multiplied by `scale` (and by E / E_kept when `rows.stride` keeps only some)."""
  (a, dy), kept = every(rows.stride, a, dy)
  scale = scale * kept
  if rows.positions > 1:  # every k-th position of each example, G scaled to all of them
    positions = a.shape[1]
    a, dy = a[:, ::rows.positions], dy[:, ::rows.positions]
    scale = scale * positions / a.shape[1]
  if rows.reduce:
    a, dy = _f32(a).mean(1, keepdims=True), _f32(dy).sum(1, keepdims=True)
  if rows.dtype is not None:
    a, dy = a.astype(rows.dtype), dy.astype(rows.dtype)
  count = a.shape[0] * a.shape[1]
  return {'a_factor': second_moment(a, diag[0]) / count,
          'g_factor': second_moment(dy, diag[1]) * scale}


def second_moment(x: jax.Array, diagonal: bool) -> jax.Array:
  """Σ over examples and positions of x xᵀ per block `(E, R, B, d) -> (B, d, d)` (or its diagonal
  `(B, d)`), accumulated and returned in float32 (float64 under x64) whatever x's dtype: bfloat16
  activations enter the matmul as they are (their products are exact in float32), the fast path
  of accelerators, instead of being copied to float32 first."""
  spec = 'erbi,erbi->bi' if diagonal else 'erbi,erbj->bij'
  return jnp.einsum(spec, x, x, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Linear maps: Dense, DenseGeneral, Einsum, Embed.attend. One einsum `x, kernel -> y`.


class Linear(NamedTuple):
  """`y = einsum(x, kernel)`: letters of x, kernel and y; bias letters (kernel's, in y order)."""

  x: str
  kernel: str
  y: str
  bias: str | None

  def groups(self) -> tuple[str, str, str, str]:
    """(rows, batch, in, out) letters: rows are x's and y's only, batch all three's."""
    rows = ''.join(c for c in self.x if c in self.y and c not in self.kernel)
    batch = ''.join(c for c in self.kernel if c in self.x and c in self.y)
    ins = ''.join(c for c in self.kernel if c in self.x and c not in self.y)
    outs = ''.join(c for c in self.kernel if c in self.y and c not in self.x)
    return rows, batch, ins, outs


def _linear_spec(lin: Linear, kernel_shape: tuple[int, ...], role: str, params: tuple[str, ...],
                 shapes: tuple[tuple[int, ...], ...]) -> Match:
  rows, batch, ins, outs = lin.groups()
  if any(c not in lin.x + lin.kernel for c in lin.y):
    return Unsupported('an output axis from neither operand')
  summed = [c for c in lin.x + lin.kernel
            if c not in lin.y and not (c in lin.x and c in lin.kernel)]
  if summed or len(set(lin.x)) != len(lin.x) or len(set(lin.kernel)) != len(lin.kernel):
    return Unsupported('an operand summed over, or repeated, outside the contraction')
  if not rows:
    return Unsupported('no axis of the input that the weights are shared over')
  size = dict(zip(lin.kernel, kernel_shape))
  n = lambda letters: math.prod(size[c] for c in letters)
  b, d_in, d_out = n(batch), n(ins), n(outs)
  kernel = Reshape(kernel_shape, tuple(lin.kernel.index(c) for c in batch + ins + outs),
                   (b, d_in, d_out))
  layout = [kernel]
  if lin.bias is not None:
    bias_shape = tuple(size[c] for c in lin.bias)
    layout.append(Reshape(bias_shape, tuple(lin.bias.index(c) for c in batch + outs),
                          (b, 1, d_out)))
  attend = role == 'attend'
  return Spec(kind='embed' if attend else 'dense', role=role, params=params, shapes=shapes,
              curvature='kronecker', blocks=b, dims=(d_in + (lin.bias is not None), d_out),
              layout=tuple(layout), n_scaled=(False, True), config=lin)


def _linear_rows(lin: Linear, x: jax.Array, letters: str, target: str, b: int) -> jax.Array:
  """`x` as `(E, R, B, d)`: the first row axis is the examples' axis."""
  rows = lin.groups()[0]
  x = jnp.einsum(f'{letters}->{rows}{target}', x)
  return x.reshape(x.shape[0], -1, b, math.prod(x.shape[len(rows):]) // b)


def _linear_stats(spec: Spec, saved: Any, dy: jax.Array, rows: Rows,
                  diag: tuple[bool, bool]) -> dict[str, jax.Array]:
  lin, (x,) = spec.config, saved
  _, batch, ins, outs = lin.groups()
  a = _linear_rows(lin, x, lin.x, batch + ins, spec.blocks)
  if lin.bias is not None:
    a = _with_ones(a)
  g = _linear_rows(lin, dy, lin.y, batch + outs, spec.blocks)
  return kronecker_terms(a, g, rows, diag)


def _letters(n: int, skip: str = '') -> str:
  return ''.join(c for c in _LETTERS if c not in skip)[:n]


def _dense_spec(x: jax.Array, features: int, use_bias: bool) -> Match:
  """`nn.Dense`, `nnx.Linear`: every leading axis of the input is a row; kernel `(in, out)`,
  bias as A's 1."""
  rows = _letters(x.ndim - 1, 'io')
  lin = Linear(rows + 'i', 'io', rows + 'o', 'o' if use_bias else None)
  shape = (x.shape[-1], features)
  params = ('kernel', 'bias') if use_bias else ('kernel',)
  shapes = (shape, (features,)) if use_bias else (shape,)
  return _linear_spec(lin, shape, 'apply', params, shapes)


def _dense(module: nn.Dense, method: str, args: tuple, kwargs: dict) -> Match:
  return _dense_spec(call_input(args, kwargs), module.features, module.use_bias)


def _nnx_linear(module: nnx.Linear, method: str, args: tuple, kwargs: dict) -> Match:
  return _dense_spec(call_input(args, kwargs), module.out_features, module.bias is not None)


def _tuple(v: Any) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _general_spec(x: jax.Array, axis: Any, batch_dims: Any, features: Any,
                  use_bias: bool) -> Match:
  """`nn.DenseGeneral`, `nnx.LinearGeneral` (and so attention's query, key, value, out): the
  contracted `axis` form A's side, `features` G's, each index of the batch axes is its own
  Kronecker block, and every other input axis is a row."""
  axis = tuple(a % x.ndim for a in _tuple(axis))
  batch_dims = tuple(a % x.ndim for a in _tuple(batch_dims))
  features = tuple(_tuple(features))
  letters = _letters(x.ndim + len(features))
  xs, fs = letters[:x.ndim], letters[x.ndim:]
  batch = ''.join(xs[d] for d in batch_dims)
  kernel = batch + ''.join(xs[d] for d in axis) + fs
  y = batch + ''.join(xs[d] for d in range(x.ndim) if d not in axis and d not in batch_dims) + fs
  lin = Linear(xs, kernel, y, batch + fs if use_bias else None)
  shape = tuple(x.shape[d] for d in batch_dims + axis) + features
  params = ('kernel', 'bias') if use_bias else ('kernel',)
  bias = tuple(x.shape[d] for d in batch_dims) + features
  return _linear_spec(lin, shape, 'apply', params, (shape, bias) if use_bias else (shape,))


def _dense_general(module: nn.DenseGeneral, method: str, args: tuple, kwargs: dict) -> Match:
  return _general_spec(call_input(args, kwargs), module.axis, module.batch_dims,
                       module.features, module.use_bias)


def _nnx_linear_general(module: nnx.LinearGeneral, method: str, args: tuple,
                        kwargs: dict) -> Match:
  return _general_spec(call_input(args, kwargs), module.axis, tuple(module.batch_axis),
                       module.out_features, module.bias is not None)


def _einsum(module: nn.Einsum | nnx.Einsum, method: str, args: tuple, kwargs: dict) -> Match:
  """`nn.Einsum`, `nnx.Einsum` whose equation reads `input, kernel -> output`: kernel letters
  contracted with the input form A's side, kernel letters kept in the output G's, letters of
  all three are blocks, input-and-output letters are rows. Anything else (a summed input axis,
  `...`) gets the fallback."""
  x = call_input(args, kwargs)
  equation = kwargs.get('einsum_str', args[1] if len(args) > 1 else None) or module.einsum_str
  equation = equation.replace(' ', '')
  if '...' in equation or '->' not in equation or equation.count(',') != 1:
    return Unsupported(f'the equation {equation!r} (write it explicitly, without "...")')
  operands, y = equation.split('->')
  xl, kl = operands.split(',')
  if isinstance(module, nn.Module):
    shape, use_bias = tuple(module.shape), module.use_bias
  else:
    shape, use_bias = tuple(module.kernel_shape), module.bias is not None
  bias = ''.join(c for c in y if c in kl) if use_bias else None
  lin = Linear(xl, kl, y, bias)
  params = ('kernel', 'bias') if use_bias else ('kernel',)
  shapes = (shape, tuple(shape[kl.index(c)] for c in bias)) if bias is not None else (shape,)
  if len(xl) != x.ndim:
    return Unsupported(f'the equation {equation!r} for an input of rank {x.ndim}')
  return _linear_spec(lin, shape, 'apply', params, shapes)


# ---------------------------------------------------------------------------------------------
# Embed: lookup (A diagonal: token frequencies) and attend (the tied output layer).


class EmbedConfig(NamedTuple):
  num_embeddings: int
  features: int


def _embed(module: nn.Embed, method: str, args: tuple, kwargs: dict) -> Match:
  """`nn.Embed`: the table `(vocab, features)` with a diagonal A over tokens (a lookup's input
  is one-hot, so `E[a aᵀ]` is the diagonal of token frequencies: O(vocab)) and a dense G over
  features. `attend` (a tied output layer, `x Eᵀ`) is weight sharing: its output gradients
  (diagonal) add to the token side and its inputs average into the feature side."""
  v, d = module.num_embeddings, module.features
  common = dict(params=('embedding',), shapes=((v, d),), curvature='kronecker', blocks=1,
                dims=(v, d), layout=(Reshape((v, d), (0, 1), (1, v, d)),))
  if method == '__call__':
    return Spec(kind='embed', role='lookup', n_scaled=(False, True),
                config=EmbedConfig(v, d), **common)
  if method == 'attend':  # y = x Eᵀ: E's rows (tokens) see output gradients, its columns inputs
    x = call_input(args, kwargs)
    rows = _letters(x.ndim - 1, 'vd')
    return Spec(kind='embed', role='attend', n_scaled=(True, False),
                config=Linear(rows + 'd', 'vd', rows + 'v', None), **common)
  return None


def _embed_stats(spec: Spec, saved: Any, dy: jax.Array, rows: Rows,
                 diag: tuple[bool, bool]) -> dict[str, jax.Array]:
  if spec.role == 'attend':  # x Eᵀ: E's columns see the inputs, its rows (tokens) the gradients
    lin, (x,) = spec.config, saved
    terms = kronecker_terms(_linear_rows(lin, x, lin.x, 'd', 1),
                            _linear_rows(lin, dy, lin.y, 'v', 1), rows, (diag[1], True))
    return {'a_factor': terms['g_factor'], 'g_factor': terms['a_factor']}
  (tokens,) = saved
  v = spec.config.num_embeddings
  tokens = tokens.reshape(tokens.shape[0] if tokens.ndim else 1, -1)
  (tokens, dy), scale = every(rows.stride, tokens,
                              _f32(dy).reshape(tokens.shape + (dy.shape[-1],)))
  if rows.reduce:  # diag of (1/E) Σ_e ā ā ᵀ, ā_e the token frequencies of example e
    freq = jax.vmap(lambda t: jnp.zeros((v,), dy.dtype).at[t].add(1.0 / t.shape[0]))(tokens)
    a = jnp.mean(freq**2, axis=0)
    dy = dy.sum(1, keepdims=True)
  else:
    a = jnp.zeros((v,), dy.dtype).at[tokens.ravel()].add(1.0 / tokens.size)
  g = second_moment(dy[:, :, None], diag[1])  # one block
  return {'a_factor': a[None], 'g_factor': g * scale}


# ---------------------------------------------------------------------------------------------
# Convolutions: Conv (grouped and depthwise too) and ConvTranspose. Patches come from the module
# itself: a clone with one input channel and a one-hot kernel, applied once per input shape to
# an image of position numbers, says which input position each kernel entry multiplies at each
# output position (with the module's own padding, strides and dilations); the patches are then
# one gather of the input.


class ConvConfig(NamedTuple):
  patch: Callable[[jax.Array, jax.Array], jax.Array]  # (one-hot kernel, 1-channel input) -> y
  window: tuple[int, ...]
  groups: int
  in_features: int
  use_bias: bool


def _linen_patch(patcher: nn.Module, kernel: jax.Array, x: jax.Array) -> jax.Array:
  return patcher.apply({'params': {'kernel': kernel}}, x)


def _nnx_patch(cls: type, fields: tuple, kernel: jax.Array, x: jax.Array) -> jax.Array:
  """The conv of `cls` (nnx.Conv or ConvTranspose), built with the layer's own padding, strides
  and dilations, one input channel, and `kernel`."""
  conv = cls(1, kernel.shape[-1], use_bias=False, kernel_init=nnx.initializers.zeros,
             precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0), **dict(fields))
  conv.kernel = nnx.Param(kernel)
  return conv(x)


def _conv(module: nn.Module | nnx.Module, method: str, args: tuple, kwargs: dict) -> Match:
  """`nn.Conv`, `nnx.Conv` (1-3 spatial dims, any padding including CIRCULAR, REFLECT and
  CAUSAL, strides, dilations) and `ConvTranspose`: rows are output positions, A's side a patch
  in the kernel's `(window..., in)` order. `feature_group_count > 1` (grouped, depthwise) gives
  one Kronecker block per group. A kernel `mask` or `transpose_kernel=True` get the fallback.
  Patches come from the layer's own conv code, with one input channel and a one-hot kernel."""
  x = call_input(args, kwargs)
  window = tuple(_tuple(module.kernel_size))
  k = math.prod(window)
  groups = getattr(module, 'feature_group_count', 1)
  if getattr(module, 'transpose_kernel', False):
    return Unsupported('transpose_kernel=True')
  if module.mask is not None:
    return Unsupported('a kernel `mask`')
  linen = isinstance(module, nn.Module)
  c, o = x.shape[-1], module.features if linen else module.out_features
  use_bias = module.use_bias if linen else module.bias is not None
  cg, og = c // groups, o // groups
  if linen:
    patch = functools.partial(_linen_patch, module.clone(
        parent=None, name=None, features=k, use_bias=False, mask=None,
        precision=jax.lax.Precision.HIGHEST, dtype=jnp.float32, param_dtype=jnp.float32,
        kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
        **({'feature_group_count': 1} if groups != 1 else {})))
  else:
    names = ('kernel_size', 'strides', 'padding', 'input_dilation', 'kernel_dilation')
    cls = next(c for c in type(module).__mro__ if c in KINDS)
    patch = functools.partial(_nnx_patch, cls, tuple(
        (n, getattr(module, n)) for n in names if hasattr(module, n)))
  shape = window + (cg, o)
  layout = [Reshape(window + (cg, groups, og), (len(window) + 1, *range(len(window)),
                                                 len(window), len(window) + 2),
                    (groups, k * cg, og))]
  params, shapes = ('kernel',), (shape,)
  if use_bias:
    layout.append(Reshape((groups, og), (0, 1), (groups, 1, og)))
    params, shapes = ('kernel', 'bias'), (shape, (o,))
  return Spec(kind='conv', role='apply', params=params, shapes=shapes, curvature='kronecker',
              blocks=groups, dims=(k * cg + use_bias, og), layout=tuple(layout),
              n_scaled=(False, True), config=ConvConfig(patch, window, groups, c, use_bias))


def _onehot_kernel(window: tuple[int, ...], dtype: Any) -> jax.Array:
  """`window + (1, K)`: output feature k of a one-input-channel conv reads kernel entry k."""
  k = math.prod(window)
  return jnp.eye(k, dtype=dtype).reshape(window + (1, k))


def patch_positions(config: ConvConfig, spatial: tuple[int, ...]) -> np.ndarray | None:
  """`(T, K)`: the flat input position that kernel entry k multiplies at output position t,
  or -1 where it multiplies padding (or an input-dilation hole). The module's own conv, with a
  one-hot kernel at the highest precision, applied to the image of position numbers 1..S and
  to an image of ones (run once per trace, on constants). None where some output is not one
  input or zero (a conv that sums wrapped outputs, as a circular ConvTranspose)."""
  k, size = math.prod(config.window), math.prod(spatial)
  with jax.ensure_compile_time_eval(), _internal():
    onehot = _onehot_kernel(config.window, jnp.float32)
    numbers = jnp.arange(1, size + 1, dtype=jnp.float32).reshape((1,) + spatial + (1,))
    out = np.asarray(config.patch(onehot, numbers)).reshape(-1, k)
    ones = np.asarray(config.patch(onehot, jnp.ones_like(numbers))).reshape(-1, k)
  if not (np.all((ones == 0) | (ones == 1)) and np.all(out == np.rint(out))):
    return None
  return np.where(ones == 1, np.rint(out).astype(np.int64) - 1, -1)


def lattice(spatial: tuple[int, ...], k: int) -> np.ndarray:
  """Flat indices of the positions of a `spatial` grid whose coordinates sum to a multiple of
  `k`: about 1/k of them, on every row and column alike (borders included)."""
  coords = np.indices(spatial).reshape(len(spatial), -1)
  return np.flatnonzero(coords.sum(0) % k == 0)


def conv_patches(config: ConvConfig, x: jax.Array, keep: np.ndarray | None = None) -> jax.Array:
  """`(E, T, K * C)` input patches of a conv call in kernel `(window..., C)` order (only the
  output positions `keep`, if given): one gather of `x` (a zero row for padding) at
  `patch_positions`, else the one-hot conv per channel."""
  batch = x.ndim - len(config.window) - 1
  e = math.prod(x.shape[:batch]) if batch else 1
  spatial = x.shape[batch:-1]
  positions = patch_positions(config, spatial)
  if positions is None:  # the clone computes in float32: back to x's dtype (exact, one-hot)
    onehot = _onehot_kernel(config.window, x.dtype)
    with _internal():
      patches = jax.vmap(lambda xc: config.patch(onehot, xc[..., None]), in_axes=-1,
                         out_axes=-1)(x)  # (..., *out, K, C)
    patches = patches.astype(x.dtype).reshape(e, -1, onehot.shape[-1] * config.in_features)
    return patches if keep is None else patches[:, keep]
  positions = positions if keep is None else positions[keep]
  size = math.prod(spatial)
  rows = jnp.concatenate([x.reshape(e, size, -1), jnp.zeros((e, 1, x.shape[-1]), x.dtype)], 1)
  patches = rows[:, np.where(positions < 0, size, positions)]  # (E, T, K, C)
  return patches.reshape(e, positions.shape[0], -1)


def _conv_stats(spec: Spec, saved: Any, dy: jax.Array, rows: Rows,
                diag: tuple[bool, bool]) -> dict[str, jax.Array]:
  config, (x,) = spec.config, saved
  scale = 1.0
  if x.ndim == len(config.window) + 2:  # one batch axis: subsample before extracting patches
    (x, dy), scale = every(rows.stride, x, dy)
    rows = rows._replace(stride=1)
  keep = None
  if rows.positions > 1:  # a lattice of output positions, chosen before the patches are gathered
    batch = dy.ndim - len(config.window) - 1
    keep = lattice(dy.shape[batch:-1], rows.positions)
    scale *= math.prod(dy.shape[batch:-1]) / keep.size
    dy = dy.reshape(dy.shape[:batch] + (-1, dy.shape[-1]))[..., keep, :]
    rows = rows._replace(positions=1)
  if rows.dtype is not None:  # rounded before the gather: the patches move fewer bytes
    x = x.astype(rows.dtype)
  patches = conv_patches(config, x, keep)
  e, t = patches.shape[:2]
  g, k = config.groups, math.prod(config.window)
  a = patches.reshape(e, t, k, g, -1).transpose(0, 1, 3, 2, 4).reshape(e, t, g, -1)
  if config.use_bias:
    a = _with_ones(a)
  return kronecker_terms(a, dy.reshape(e, t, g, -1), rows, diag, scale)


# ---------------------------------------------------------------------------------------------
# Norms: BatchNorm, LayerNorm, GroupNorm, RMSNorm, InstanceNorm. Unit-wise (scale, bias) blocks.


class NormConfig(NamedTuple):
  normalizer: nn.Module | None  # linen: unbound clone without scale and bias, computes x̂
  feature_axes: tuple[int, ...]
  names: tuple[str, ...]


def _norm(module: nn.Module | nnx.Module, method: str, args: tuple, kwargs: dict) -> Match:
  """Norms with a per-feature `scale` and/or `bias`: the unit-wise Fisher of SP-NGD (Osawa et
  al., TPAMI 2020), per feature a 2x2 block (1x1 with one parameter). `x̂` comes from the module
  itself, cloned without scale and bias, so a zero scale (zero-initialised residual branches) is
  safe and BatchNorm uses the batch statistics it trains with."""
  x = call_input(args, kwargs)
  names = tuple(n for n, on in (('scale', module.use_scale),
                                ('bias', getattr(module, 'use_bias', False))) if on)
  if not names:
    return None
  if isinstance(module, nn.GroupNorm):
    axes = (x.ndim - 1,)
  else:  # linen and nnx name the feature axes differently per norm
    axes = next(getattr(module, n) for n in ('feature_axes', 'feature_axis', 'axis')
                if hasattr(module, n))
    axes = tuple(a % x.ndim for a in _tuple(axes))
  shape = tuple(x.shape[a] for a in axes)
  c = math.prod(shape)
  normalizer = None
  if isinstance(module, nn.Module):
    off = {'use_scale': False}
    if hasattr(module, 'use_bias'):
      off['use_bias'] = False
    normalizer = module.clone(parent=None, name=None, **off)
  return Spec(kind='norm', role='apply', params=names, shapes=(shape,) * len(names),
              curvature='unitwise', blocks=1, dims=(c, len(names)),
              layout=tuple(Reshape(shape, tuple(range(len(shape))), (c,)) for _ in names),
              n_scaled=(True, True), config=NormConfig(normalizer, axes, names))


def _norm_save(spec: Spec, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
  variables = {k: v for k, v in module.variables.items() if k != 'params'}
  with _internal():
    x_hat, _ = spec.config.normalizer.apply(variables, *args, mutable=True, **kwargs)
  return (jax.lax.stop_gradient(x_hat),)


def _nnx_norm_save(spec: Spec, module: nnx.Module, args: tuple, kwargs: dict) -> tuple:
  """x̂ from a clone of the nnx norm without scale and bias (its state updates are dropped)."""
  with _internal():
    normalizer = nnx.clone(module)
    for name in ('scale', 'bias'):
      if hasattr(normalizer, name):
        setattr(normalizer, name, None)
      if hasattr(normalizer, f'use_{name}'):
        setattr(normalizer, f'use_{name}', False)
    x_hat = normalizer(*args, **kwargs)
  return (jax.lax.stop_gradient(x_hat),)


def _norm_stats(spec: Spec, saved: Any, dy: jax.Array, rows: Rows,
                diag: tuple[bool, bool]) -> dict[str, jax.Array]:
  (x_hat,), axes = saved, spec.config.feature_axes
  dy = _f32(dy)
  per = {'scale': dy * _f32(x_hat), 'bias': dy}
  u = jnp.stack([per[n] for n in spec.config.names], axis=-1)  # (..., k)
  rest = [a for a in range(dy.ndim) if a not in axes]
  u = jnp.moveaxis(u, list(axes), list(range(dy.ndim - len(axes), dy.ndim)))
  u = u.reshape(-1, math.prod(dy.shape[a] for a in rest[1:]) if rest else 1, spec.dims[0],
                len(spec.config.names)) if rest else u.reshape(1, 1, spec.dims[0], -1)
  (u,), scale = every(rows.stride, u)
  if rows.reduce:
    u = u.sum(1, keepdims=True)
  return {'fisher': jnp.einsum('ercj,erck->cjk', u, u) * scale}


# ---------------------------------------------------------------------------------------------
# The table.


class Kind(NamedTuple):
  match: Callable[[nn.Module, str, tuple, dict], Match]
  statistics: Callable[[Spec, Any, jax.Array, Rows, tuple[bool, bool]], dict[str, jax.Array]]
  save: Callable[[Spec, nn.Module, tuple, dict], tuple] | None = None  # default: (input,)
  methods: tuple[str, ...] = ('__call__',)


KINDS: dict[type, Kind] = {
    # flax.linen
    nn.Dense: Kind(_dense, _linear_stats),
    nn.DenseGeneral: Kind(_dense_general, _linear_stats),
    nn.Einsum: Kind(_einsum, _linear_stats),
    nn.Embed: Kind(_embed, _embed_stats, methods=('__call__', 'attend')),
    nn.Conv: Kind(_conv, _conv_stats),
    nn.ConvTranspose: Kind(_conv, _conv_stats),
    nn.BatchNorm: Kind(_norm, _norm_stats, save=_norm_save),
    nn.LayerNorm: Kind(_norm, _norm_stats, save=_norm_save),
    nn.GroupNorm: Kind(_norm, _norm_stats, save=_norm_save),
    nn.RMSNorm: Kind(_norm, _norm_stats, save=_norm_save),
    nn.InstanceNorm: Kind(_norm, _norm_stats, save=_norm_save),
    # flax.nnx: the same kinds and statistics (nnx.MultiHeadAttention is LinearGenerals)
    nnx.Linear: Kind(_nnx_linear, _linear_stats),
    nnx.LinearGeneral: Kind(_nnx_linear_general, _linear_stats),
    nnx.Einsum: Kind(_einsum, _linear_stats),
    nnx.Embed: Kind(_embed, _embed_stats, methods=('__call__', 'attend')),
    nnx.Conv: Kind(_conv, _conv_stats),
    nnx.ConvTranspose: Kind(_conv, _conv_stats),
    nnx.BatchNorm: Kind(_norm, _norm_stats, save=_nnx_norm_save),
    nnx.LayerNorm: Kind(_norm, _norm_stats, save=_nnx_norm_save),
    nnx.GroupNorm: Kind(_norm, _norm_stats, save=_nnx_norm_save),
    nnx.RMSNorm: Kind(_norm, _norm_stats, save=_nnx_norm_save),
    nnx.InstanceNorm: Kind(_norm, _norm_stats, save=_nnx_norm_save),
}

# Modules whose parameters are used through a transformation of their own (the kernel a child
# layer sees is not the parameter stored): their layers get the fallback.
REPARAMETERIZING = (nn.WeightNorm, nn.SpectralNorm, nnx.WeightNorm, nnx.SpectralNorm)


def kind_of(module: nn.Module) -> tuple[type, Kind] | None:
  """The table row of a module: its own class, or the nearest listed base class."""
  for cls in type(module).__mro__:
    if cls in KINDS:
      return cls, KINDS[cls]
  return None


def match(module: nn.Module, method: str, args: tuple, kwargs: dict) -> tuple[Kind, Match] | None:
  """The kind and spec of a module method call, or None for a call capture ignores."""
  if type(module).__module__ == 'flax.linen.transforms':
    return None  # a lifted wrapper (nn.remat(nn.Dense), ...): its inner call is the layer's
  found = kind_of(module)
  if found is None or method not in found[1].methods:
    return None
  cls, kind = found
  mro = type(module).__mro__
  if isinstance(module, nn.Module) and any('param' in vars(c) for c in mro[:mro.index(cls)]):
    return kind, Unsupported(f'{type(module).__name__} overrides `param` (a reparameterised'
                             ' kernel)')
  return kind, kind.match(module, method, args, kwargs)


def overrides(module: Any, method: str) -> int:
  """How many classes between a module's own class and its table row redefine `method` (a
  subclass whose `__call__` scales `super().__call__`'s output): the row's own call, the
  innermost, is the one whose input and output gradient are the layer's."""
  found = kind_of(module)
  if found is None:
    return 0
  mro = type(module).__mro__
  return sum(method in vars(c) for c in mro[:mro.index(found[0])])


def save(kind: Kind, spec: Spec, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
  if kind.save is not None:
    return kind.save(spec, module, args, kwargs)
  return (call_input(args, kwargs),)


def call_input(args: tuple, kwargs: dict) -> jax.Array:
  if args:
    return args[0]
  for name in ('inputs', 'x', 'query'):
    if name in kwargs:
      return kwargs[name]
  raise ValueError(f'kfax: cannot find the input of a layer call among {list(kwargs)}.')


# Capture's interceptor must not capture the clones that kinds run for patches and x̂.
_local = threading.local()


class _internal:
  def __enter__(self):
    _local.depth = getattr(_local, 'depth', 0) + 1

  def __exit__(self, *exc):
    _local.depth -= 1


def internal() -> bool:
  return getattr(_local, 'depth', 0) > 0
