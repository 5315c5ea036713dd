"""Capture: the loss, its gradients and every layer's K-FAC statistics from one forward pass.

`flax.linen.intercept_methods` sees every module call inside a linen loss (`_nnx.py` gives an
NNX model's layers the same hook, `_Trace.call`). A first, shape-only trace
(`jax.eval_shape`) finds the calls of the kinds in `_kinds.KINDS` and builds the layer table.
The real pass then adds to each captured layer's params subtree a zero *accumulator* and routes
each call's output through a `custom_vjp` identity whose backward pass computes the call's
statistics from its saved input and its output gradient and returns them as the accumulator's
cotangent. The statistics are therefore gradients: they come out of `nn.remat`, `nn.scan`
(one accumulator slice per scanned layer), `nn.vmap`, `nn.jit` and recurrent cells (summed over
time steps, like weight sharing) exactly as parameter gradients do. With `fisher="mc"` the same
forward pass is pulled back a second time with targets sampled from the model.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from kfax import _kinds, _nnx, _table
from kfax._table import Entry, LayerTable

FISHER_TYPES = ('empirical', 'mc')
SEQUENCES = ('expand', 'reduce')
FALLBACKS = ('diagonal', 'none')
ACC = '__kfax__'  # the accumulator's name in a layer's params subtree
# Statistics are float32, or float64 when x64 is on (exact references); never lower.
_STATS_DTYPE = lambda: jax.dtypes.canonicalize_dtype(jnp.float64)
Stats = dict[str, dict[str, jax.Array]]

_local = threading.local()


class _Mark(NamedTuple):
  output: jax.Array
  sampled_cotangent: Callable[[jax.Array, jax.Array], jax.Array]
  examples: jax.Array
  curvature: Callable[[jax.Array, jax.Array], jax.Array] | None  # (z, u) -> Hessian of loss @ u


def mark_output(output: jax.Array, sampled_cotangent: Callable, examples: Any,
                curvature: Callable | None = None) -> None:
  """Called by kfax losses: a model output, its MC cotangent, the loss's number of examples and
  its Hessian-vector product in the output."""
  stack = getattr(_local, 'stack', [])
  if stack:
    stack[-1].marks.append(_Mark(output, sampled_cotangent, jnp.asarray(examples, jnp.float32),
                                 curvature))


class _Marks:
  """A capture that only collects the marked outputs (for Gauss-Newton products)."""

  def __init__(self) -> None:
    self.marks: list[_Mark] = []


@contextlib.contextmanager
def _marking() -> Iterator[_Marks]:
  stack = _local.__dict__.setdefault('stack', [])
  stack.append(_Marks())
  try:
    yield stack[-1]
  finally:
    stack.pop()


class _Record:
  """What the shape-only trace saw of one params subtree."""

  def __init__(self) -> None:
    self.specs: dict[str, _kinds.Spec] = {}  # by role
    self.reasons: list[str] = []
    self.module = ''
    self.stack: tuple[int, ...] | None = None
    self.vma: set = set()


def _vma(x: Any) -> set:
  """The device axes a value varies over inside `shard_map` (`check_vma=True`); empty elsewhere.
  jax >= 0.10 keeps them in `typeof(x).manual_axis_type.varying`, earlier jax in `.vma`."""
  try:
    t = jax.typeof(x)
  except (TypeError, AttributeError):
    return set()
  manual = getattr(t, 'manual_axis_type', None)
  return set(getattr(manual, 'varying', None) or getattr(t, 'vma', None) or ())


class _Trace:
  """One trace of the loss: records calls (shape-only pass) or taps them (real pass)."""

  def __init__(self, params: Any, shape_only: bool, rows: _kinds.Rows):
    self.ids = {id(leaf): tuple(p.split('/')) for p, leaf in _table.named_leaves(params)}
    self.shapes = {p: tuple(jnp.shape(leaf)) for p, leaf in _table.named_leaves(params)}
    self.subtrees = _table.subtree_paths(params)
    self.shape_only = shape_only  # records calls; else taps them
    self.rows = rows
    self.records: dict[str, _Record] = {}
    self.marks: list[_Mark] = []
    self.active: list[str] = []  # enclosing reparameterising modules (nn.WeightNorm, ...)
    self.depth: dict[tuple[int, str], int] = {}  # nesting of overridden layer methods (linen)

  def locate(self, module: nn.Module, names: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path, in the params given to the loss, of a linen module's own parameters."""
    own = module.variables.get('params', {})
    for name in names:
      leaf = own.get(name)
      leaf = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
      if id(leaf) in self.ids:
        return self.ids[id(leaf)][:-1]
    target = tuple(str(p) for p in module.path)  # inside a lifted transform: by module path
    found = [p for p in self.subtrees if target and p[len(p) - len(target):] == target]
    return found[0] if len(found) == 1 else None

  def intercept(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """The linen front-end: `nn.intercept_methods` calls this for every module method call."""
    if _kinds.internal():
      return next_fun(*args, **kwargs)
    module, method = context.module, context.method_name
    overriding = _kinds.overrides(module, method)
    if overriding:  # a subclass redefines the layer's method: only the innermost call is its
      depth = self.depth.get((id(module), method), 0)
      if depth < overriding:
        self.depth[id(module), method] = depth + 1
        try:
          return next_fun(*args, **kwargs)
        finally:
          self.depth[id(module), method] = depth

    def path(found: tuple | None) -> tuple[str, ...] | None:
      own = tuple(k for k, v in module.variables.get('params', {}).items()
                  if not isinstance(v, Mapping))
      spec = None if found is None else found[1]
      if found is None and not own:
        return None
      return self.locate(module, spec.params if isinstance(spec, _kinds.Spec) else own)

    acc = None if self.shape_only else module.variables.get('params', {}).get(ACC)
    return self.call(module, method, path, next_fun, args, kwargs, acc)

  def call(self, module: Any, method: str, path: Callable[[Any], tuple[str, ...] | None],
           next_fun: Callable, args: tuple, kwargs: dict, acc: dict | None) -> Any:
    """One module method call, from either front-end: recorded (shape-only pass) or tapped.
    `path(found)` is where the module's parameters are; `acc` its accumulators (real pass)."""
    found = _kinds.match(module, method, args, kwargs)
    if found is not None and self.active:
      found = (found[0], _kinds.Unsupported(
          f'called inside {self.active[-1]} (a reparameterised kernel)'))
    if self.shape_only:
      self._record(path(found), class_name(module), found, args, kwargs)
      return self._call(module, next_fun, args, kwargs)
    y = self._call(module, next_fun, args, kwargs)
    if found is None or not isinstance(found[1], _kinds.Spec):
      return y
    kind, spec = found
    if acc is None or spec.role not in acc:
      return y
    missing = _vma(_kinds.call_input(args, kwargs)) - _vma(acc[spec.role]['calls'])
    if missing:
      raise ValueError(
          f'kfax: the statistics of {type(module).__name__} {_name(module)} would vary over'
          f' the device axes {sorted(missing, key=str)}, but a transform around it (vmap over'
          ' parameters) drops that under shard_map(check_vma=True); use check_vma=False for'
          ' this model.')
    saved = _kinds.save(kind, spec, module, args, kwargs)
    return _tap(kind, spec, self.rows, _diagonal_sides(acc[spec.role]))(y, saved, acc[spec.role])

  def _call(self, module: Any, next_fun: Callable, args: tuple, kwargs: dict) -> Any:
    """Runs the call, remembering reparameterising wrappers (their children's kernels are not
    the stored parameters)."""
    if not isinstance(module, _kinds.REPARAMETERIZING):
      return next_fun(*args, **kwargs)
    self.active.append(type(module).__name__)
    try:
      return next_fun(*args, **kwargs)
    finally:
      self.active.pop()

  def _record(self, path: tuple[str, ...] | None, module: str, found: tuple | None,
              args: tuple, kwargs: dict) -> None:
    if path is None:
      return
    record = self.records.setdefault('/'.join(path), _Record())
    record.module = module
    if found is None:  # who owns parameters that no kind captures, for the summary
      return
    kind, spec = found
    if isinstance(spec, _kinds.Unsupported):
      record.reasons.append(spec.reason)
      return
    before = record.specs.get(spec.role)
    if before is not None and before._replace(config=None) != spec._replace(config=None):
      record.reasons.append('calls of incompatible shapes')
      return
    record.specs[spec.role] = spec
    stored = self.shapes.get('/'.join(path + (spec.params[0],)))
    call = spec.shapes[0]
    if stored is None or tuple(stored[len(stored) - len(call):]) != call:
      record.reasons.append('parameters stacked on an axis other than the leading ones')
      return
    stack = tuple(stored[:len(stored) - len(call)])
    if record.stack not in (None, stack):
      record.reasons.append('calls at different stack depths')
    record.stack = stack
    record.vma |= _vma(_kinds.call_input(args, kwargs))


def class_name(module: Any) -> str:
  """A module's class as the summary names it: flax's by name, others with their module."""
  cls = type(module)
  if cls.__module__.startswith('flax.'):
    return cls.__name__
  return f'{cls.__module__}.{cls.__qualname__}'


def _name(module: Any) -> str:
  path = getattr(module, 'path', None)  # a linen module's path; an nnx layer's is an attribute
  return '/'.join(map(str, path)) if isinstance(path, tuple) else getattr(module, '_kfax_path', '')


def current() -> _Trace | None:
  """The trace of the loss being run, if any (not a `_marking` capture, which taps nothing)."""
  stack = getattr(_local, 'stack', [])
  return stack[-1] if stack and isinstance(stack[-1], _Trace) else None


def _diagonal_sides(acc: dict[str, jax.Array]) -> tuple[bool, bool]:
  """Which Kronecker sides of an accumulator are diagonal (one axis fewer than `calls` + 2)."""
  if 'a_factor' not in acc:
    return (False, False)
  full = acc['calls'].ndim + 3  # blocks of one call, then (n, n)
  return (acc['a_factor'].ndim < full, acc['g_factor'].ndim < full)


def _tap(kind: _kinds.Kind, spec: _kinds.Spec, rows: _kinds.Rows, diag: tuple[bool, bool]):
  """`y -> y` whose backward pass returns the call's statistics as `acc`'s cotangent."""

  @jax.custom_vjp
  def tap(y, saved, acc):
    del saved, acc
    return y

  def forward(y, saved, acc):
    return y, (saved, acc['calls'])

  def backward(residuals, dy):
    saved, calls = residuals
    stats = kind.statistics(spec, saved, dy, rows, diag)
    cotangent = {name: value.astype(calls.dtype) for name, value in stats.items()}
    cotangent['calls'] = jnp.ones_like(calls)
    return dy, jax.tree.map(_zero_cotangent, saved), cotangent

  tap.defvjp(forward, backward)
  return tap


def _zero_cotangent(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, jax.dtypes.float0)


@contextlib.contextmanager
def _tracing(trace: _Trace) -> Iterator[None]:
  stack = _local.__dict__.setdefault('stack', [])
  stack.append(trace)
  try:
    with nn.intercept_methods(trace.intercept):
      yield
  finally:
    stack.pop()


def build_table(trace: _Trace, sequence: str, fallback: str, max_factor_dim: int) -> LayerTable:
  """The layer table of a shape-only trace: captured layers, then every other parameter."""
  entries, covered = [], set()
  for key, record in trace.records.items():
    if not record.specs or record.reasons:
      continue
    specs = list(record.specs.values())
    first = specs[0]
    if any(s._replace(role='', config=None, n_scaled=(0, 0)) !=
           first._replace(role='', config=None, n_scaled=(0, 0)) for s in specs):
      record.reasons.append('used by calls that disagree on its layout')
      continue
    leaves = tuple(f'{key}/{name}' if key else name for name in first.params)
    stack = record.stack or ()
    blocks = stack + ((first.blocks,) if first.blocks > 1 else ())
    if first.curvature == 'kronecker':
      diag = (first.kind == 'embed' or first.dims[0] > max_factor_dim,
              first.dims[1] > max_factor_dim)
    else:
      diag, blocks = (False, False), stack
    roles = tuple((s.role, s.n_scaled) for s in specs)
    entries.append(Entry(key=key, kind=first.kind, curvature=first.curvature, leaves=leaves,
                         layout=first.layout, stack=stack, blocks=blocks, dims=first.dims,
                         diag=diag, roles=roles, note=''))
    covered.update(leaves)
  notes = {}
  for key, record in trace.records.items():
    if record.reasons:
      notes[key] = f'{record.module}: {"; ".join(sorted(set(record.reasons)))}'
    elif not record.specs and record.module:
      notes[key] = f'{record.module}: not a layer kind kfax captures'
  for path, shape in trace.shapes.items():
    if path in covered:
      continue
    parent = path.rsplit('/', 1)[0] if '/' in path else ''
    note = notes.get(parent, 'not used by any module call capture saw')
    entries.append(Entry(key=path, kind='fallback', curvature=fallback, leaves=(path,),
                         layout=(None,), stack=(), blocks=shape, dims=(), diag=(False, False),
                         roles=(), note=note))
  order = {p: i for i, p in enumerate(trace.shapes)}
  entries.sort(key=lambda e: order[e.leaves[0]])
  return LayerTable(tuple(entries), trace.shapes, sequence)


def _accumulators(table: LayerTable, vma: set) -> dict[str, dict]:
  """Zero accumulators per captured layer and role, device-varying like the layer's input."""
  out, axes = {}, tuple(sorted(vma, key=str))
  for key, e in table.entries.items():
    if e.curvature not in ('kronecker', 'unitwise'):
      continue
    # One call's Kronecker statistics always have a block axis (size 1 for a plain layer).
    call_blocks = e.blocks[len(e.stack):] or ((1,) if e.curvature == 'kronecker' else ())
    shapes = {name: e.stack + call_blocks + s[len(e.blocks):]
              for name, s in e.stat_shapes().items()}

    def zeros(shape):
      z = jnp.zeros(shape, _STATS_DTYPE())
      return jax.lax.pcast(z, axes, to='varying') if axes else z

    out[key] = {role: {**{n: zeros(s) for n, s in shapes.items()}, 'calls': zeros(e.stack)}
                for role, _ in e.roles}
  return out


def _inject(params: Any, accs: dict[str, dict]) -> Any:
  for key, acc in accs.items():
    params = _table.insert(params, tuple(key.split('/')) if key else (), ACC, acc)
  return params


def _combine(table: LayerTable, raw: dict[str, dict], examples: jax.Array) -> Stats:
  """Per-layer statistics from the accumulators' cotangents: N applied, A (and unit-wise) terms
  added over calls, G terms averaged over calls."""
  stats = {}
  for key, acc in raw.items():
    e = table.entries[key]
    total: dict[str, jax.Array] = {}
    calls = sum(acc[role]['calls'] for role, _ in e.roles)
    for role, n_scaled in e.roles:
      for name, value in acc[role].items():
        if name == 'calls':
          continue
        scaled = n_scaled[0] if name in ('a_factor', 'fisher') else n_scaled[1]
        value = value * examples if scaled else value
        total[name] = total[name] + value if name in total else value
    if 'g_factor' in total:
      g = total['g_factor']
      per_call = jnp.maximum(calls, 1.0).reshape(calls.shape + (1,) * (g.ndim - calls.ndim))
      total['g_factor'] = g / per_call
    shapes = e.stat_shapes()
    stats[key] = {n: v.reshape(shapes[n]) for n, v in total.items()}
  return stats


def _diagonal(table: LayerTable, sampled: Any, examples: jax.Array) -> Stats:
  """The fallback's diagonal Fisher, `N ĝ²` per parameter: with `ĝ` the gradient of the mean
  loss under MC-sampled targets, `E[N ĝ²]` is the diagonal of the per-example Fisher (the
  examples' sampled gradients are independent with mean zero)."""
  values = dict(_table.named_leaves(sampled))
  out = {}
  for key, e in table.of('diagonal').items():
    g = values[e.leaves[0]]
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
    out[key] = {'diag': examples * g * g}
  return out


class _Linen:
  """The linen front-end: `loss_fn(params, ...)`, accumulators inside the params subtrees."""

  def __init__(self, params: Any):
    _check_linen(params)
    self.params, self.state = params, None

  def prepare(self, trace: _Trace) -> None:
    del trace

  def apply(self, loss_fn: Callable, params: Any, state: None, accs: dict | None, args: tuple,
            kwargs: dict) -> tuple[Any, None]:
    del state
    return loss_fn(params if accs is None else _inject(params, accs), *args, **kwargs), None

  def finish(self, state: None) -> None:
    del state


def _front(x: Any, args: tuple, kwargs: dict) -> Any:
  if isinstance(x, nnx.Module):
    return _nnx.Model(x, args, kwargs)
  return _Linen(x)


def _check_linen(params: Any) -> None:
  """An NNX variables tree without its module: capture cannot see its layers, so say so."""
  # flax < 0.12 splits into VariableState leaves; later into Variables (and VariableState is
  # a deprecated alias, looked up only where it is a real class).
  variables = tuple(c for c in (nnx.Variable, vars(nnx).get('VariableState')) if c is not None)
  if any(isinstance(x, variables) for x in
         jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, variables))):
    raise TypeError(
        'kfax.value_grad_and_stats: the first argument holds flax.nnx variables; for an NNX'
        ' model pass the nnx.Module itself (loss_fn(model, *args)), not its state, so that'
        ' kfax can see its layers.')


def _check_value(out: Any, has_aux: bool) -> tuple[jax.Array, Any]:
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
          'kfax.value_grad_and_stats: has_aux=True, so loss_fn must return (loss, aux); it'
          f' returned {type(out).__name__}.')
    loss, aux = out
  else:
    if isinstance(out, (tuple, list)):
      raise ValueError(
          f'kfax.value_grad_and_stats: loss_fn returned a {type(out).__name__}; if it is'
          ' (loss, aux), pass has_aux=True.')
    loss, aux = out, None
  if jnp.shape(loss) != ():
    raise ValueError(
        'kfax.value_grad_and_stats: loss_fn must return a scalar mean loss'
        f'{" as the first element of (loss, aux)" if has_aux else ""}, got shape'
        f' {jnp.shape(loss)}.')
  return loss, aux


def _takes_rng(fn: Callable) -> bool:
  try:
    return 'rng' in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _examples(marks: list[_Mark], args: tuple) -> jax.Array:
  """N: the kfax loss's number of examples, else the leading axis of the first batch array."""
  if marks:
    return marks[0].examples
  for leaf in jax.tree.leaves(args):
    if jnp.ndim(leaf):
      return jnp.asarray(jnp.shape(leaf)[0], jnp.float32)
  return jnp.ones((), jnp.float32)


def _dtype_name(dtype: Any) -> str | None:
  """`jnp.dtype(dtype).name`, or None for what is not a dtype."""
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    return None


def value_grad_and_stats(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    fisher: str = 'mc',
    sequence: str = 'expand',
    fallback: str = 'diagonal',
    max_factor_dim: int = 8192,
    subsample: int = 1,
    subsample_positions: int = 1,
    stats_dtype: str | None = None,
) -> Callable[..., tuple[Any, Any, Stats]]:
  """Wraps a Flax loss to return the loss, its gradients and this batch's K-FAC statistics.

  Linen: `loss_fn(params, *args, **kwargs)` returns a mean over examples (or `(loss, aux)` with
  `has_aux=True`) and may apply any Flax linen model, with mutable collections and lifted
  transforms (`nn.remat`, `nn.scan`, `nn.vmap`, `nn.jit`, `nn.RNN`), anywhere inside.
  NNX: `loss_fn(model, *args, **kwargs)` with `model` an `nnx.Module`, as for
  `nnx.value_and_grad`; gradients are taken with respect to its `nnx.Param`s (an `nnx.State`),
  the loss's updates of its other state (BatchNorm statistics, `nnx.Rngs` counts) are applied to
  `model` as they would be without kfax, and `nnx.scan`, `nnx.vmap` and `nnx.remat` inside work.

  Every call of a layer kind in `kfax._kinds.KINDS` (linen Dense, DenseGeneral and attention,
  Einsum, Embed and `Embed.attend`, Conv including grouped and depthwise, ConvTranspose,
  BatchNorm, LayerNorm, GroupNorm, RMSNorm, InstanceNorm, and their nnx counterparts: Linear,
  LinearGeneral and MultiHeadAttention, ...) is captured by its parameters' path; every other
  parameter gets the `fallback`. `f.layers(params_or_model, *args, **kwargs)` returns the layer
  table (one shape-only trace) that `kfax.kfac` and `kfax.summary` take.

  Args:
    loss_fn: the loss, differentiated with respect to its first argument.
    has_aux: whether `loss_fn` returns `(loss, aux)`.
    fisher: `"mc"` (the default, the Fisher proper and what kfax's defaults were measured with):
      G from one more backward pass with targets sampled from the model, which needs a loss
      built from `kfax.softmax_cross_entropy`, `kfax.sigmoid_binary_cross_entropy` or
      `kfax.squared_error` and an `rng` key; `"empirical"`: G from the loss's own gradients
      (any scalar mean loss).
    sequence: for layers that share weights over positions (sequence tokens, conv positions),
      `"expand"` (the default; K-FAC-expand: positions are examples, exact for per-token losses)
      or `"reduce"` (K-FAC-reduce: positions summed per example, exact for losses on pooled
      outputs); Eschenhagen et al., NeurIPS 2023.
    fallback: `"diagonal"` (a diagonal Fisher, `N g²` of the sampled gradient) or `"none"`
      (gradients pass through) for parameters no captured layer uses.
    max_factor_dim: a Kronecker side larger than this is kept diagonal instead of dense. 8192
      keeps every factor of ResNet-50 (largest 4609) and of transformers up to d_model 2048
      dense (at most 256 MiB a factor), and a vocabulary-sized side diagonal.
    subsample: statistics from every `subsample`-th example of the batch only (1: all), scaled
      to estimate the whole batch's; the loss and gradients always use every example. The A and
      G products (and conv patches) cost about 1/subsample; the MC backward pass does not
      shrink. Each step's factors then rest on fewer examples, which the moving average
      offsets; where it pays is model by model (`benchmarks/`).
    subsample_positions: the Kronecker statistics of layers applied at many positions of an
      example (convs, Dense over tokens) from about 1/k of them, scaled to estimate all: conv
      outputs on the lattice whose coordinates sum to a multiple of k (every row and column
      alike), every k-th position elsewhere. Neighbouring positions are correlated, so this
      keeps more of the statistics than `subsample=k` at the same cost. Expand only (reduce
      sums the positions first, so there is nothing to save).
    stats_dtype: `"bfloat16"` (or `jnp.bfloat16`) rounds the inputs and output gradients of
      the Kronecker statistics to bfloat16 before their products, which still accumulate in
      float32 (the factors stay float32): the statistics matmuls at bfloat16 rates for a
      float32 model, on accelerators and on CPUs with bfloat16 dot instructions. None (the
      default) takes them in the dtype the layer computes in.

  Returns:
    `f(params_or_model, *args, rng=None, **kwargs) -> (loss or (loss, aux), grads, stats)`.
    `stats` maps each table entry with curvature to its float32 statistics (see
    `kfax.LayerTable`); pass them to `kfax.kfac`'s update as `stats=` (with `nnx.Optimizer`:
    `optimizer.update(model, grads, stats=stats)`). `rng` is the MC key; a `loss_fn` that takes
    an `rng` argument itself receives it too, and the MC sampling uses a key folded from it. N, the number of examples, comes from the kfax loss (the positions `where` is true), or
    else is the leading axis of the first array among `args`.
    `f.gauss_newton(params_or_model, *args, rng=None, **kwargs)` returns `gram(tangents)`, the
    exact Gauss-Newton products `vᵢᵀ G vⱼ` of the loss on that batch (for `kfax.quadratic_model`).
  """
  if fisher not in FISHER_TYPES:
    raise ValueError(
        f'kfax.value_grad_and_stats: `fisher` must be one of {FISHER_TYPES}, got {fisher!r}.')
  if sequence not in SEQUENCES:
    raise ValueError(
        f'kfax.value_grad_and_stats: `sequence` must be one of {SEQUENCES}, got {sequence!r}.')
  if fallback not in FALLBACKS:
    raise ValueError(
        f'kfax.value_grad_and_stats: `fallback` must be one of {FALLBACKS}, got {fallback!r}.')
  if not (isinstance(max_factor_dim, int) and max_factor_dim >= 1):
    raise ValueError('kfax.value_grad_and_stats: `max_factor_dim` must be an integer >= 1, got'
                     f' {max_factor_dim!r}.')
  if not (isinstance(subsample, int) and subsample >= 1):
    raise ValueError('kfax.value_grad_and_stats: `subsample` must be an integer >= 1 (every'
                     f' subsample-th example), got {subsample!r}.')
  if not (isinstance(subsample_positions, int) and subsample_positions >= 1):
    raise ValueError('kfax.value_grad_and_stats: `subsample_positions` must be an integer >= 1,'
                     f' got {subsample_positions!r}.')
  if subsample_positions > 1 and sequence == 'reduce':
    raise ValueError('kfax.value_grad_and_stats: `subsample_positions` thins the positions that'
                     ' sequence="expand" treats as examples; sequence="reduce" sums them first,'
                     ' so there is nothing to thin. Use `subsample` (examples) instead.')
  if stats_dtype is not None and _dtype_name(stats_dtype) != 'bfloat16':
    raise ValueError('kfax.value_grad_and_stats: `stats_dtype` must be None or "bfloat16" (whose'
                     ' range is float32\'s: float16 would flush small output gradients to zero),'
                     f' got {stats_dtype!r}.')
  rows = _kinds.Rows(sequence == 'reduce', subsample, subsample_positions,
                     None if stats_dtype is None else jnp.dtype(jnp.bfloat16))
  takes_rng = _takes_rng(loss_fn)

  def run(front: Any, params: Any, state: Any, accs: dict | None, trace: _Trace, args: tuple,
          kwargs: dict) -> tuple[tuple[jax.Array, Any], Any]:
    with _tracing(trace):
      out, new_state = front.apply(loss_fn, params, state, accs, args, kwargs)
      return _check_value(out, has_aux), new_state

  def probe(front: Any, args: tuple, kwargs: dict) -> tuple[LayerTable, _Trace]:
    traces: list[_Trace] = []
    leaves, treedef = jax.tree.flatten((args, kwargs))
    arrays = [i for i, leaf in enumerate(leaves)
              if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')]

    def shapes_only(p, state, values):  # arrays (or ShapeDtypeStructs) traced, others static
      full = list(leaves)
      for i, v in zip(arrays, values):
        full[i] = v
      a, k = jax.tree.unflatten(treedef, full)
      traces.append(_Trace(p, True, rows))
      front.prepare(traces[0])
      return run(front, p, state, None, traces[0], a, k)[0][0]

    jax.eval_shape(shapes_only, front.params, front.state, [leaves[i] for i in arrays])
    return build_table(traces[0], sequence, fallback, max_factor_dim), traces[0]

  def layers(x: Any, *args: Any, rng: jax.Array | None = None, **kwargs: Any) -> LayerTable:
    """The layer table of this loss at these params (or model) and arguments (one shape-only
    trace)."""
    if takes_rng:
      kwargs['rng'] = jax.random.key(0) if rng is None else rng
    return probe(_front(x, args, kwargs), args, kwargs)[0]

  def value_grad_stats(x: Any, *args: Any, rng: jax.Array | None = None, **kwargs: Any):
    if fisher == 'mc' and rng is None:
      raise ValueError(
          'kfax.value_grad_and_stats: fisher="mc" samples targets and needs a PRNG key; call'
          ' f(params, ..., rng=jax.random.key(step)), or pass fisher="empirical".')
    if takes_rng:
      kwargs['rng'] = rng
      rng = None if rng is None else jax.random.fold_in(rng, 0x6B666178)
    front = _front(x, args, kwargs)
    table, shapes = probe(front, args, kwargs)
    if fisher == 'mc' and not shapes.marks:
      raise ValueError(
          'kfax.value_grad_and_stats: fisher="mc" needs the loss to be built from'
          ' kfax.softmax_cross_entropy, kfax.sigmoid_binary_cross_entropy or'
          ' kfax.squared_error, which mark the distribution to sample from; use'
          ' fisher="empirical" for any other loss.')
    # Statistics vary over every device axis the batch or a layer input varies over.
    axes = set().union(*(r.vma for r in shapes.records.values()),
                       *(_vma(leaf) for leaf in jax.tree.leaves((args, kwargs))))
    traces: list[_Trace] = []

    def forward(p, accs):
      traces.append(_Trace(p, False, rows))
      (loss, aux), state = run(front, p, front.state, accs, traces[-1], args, kwargs)
      marks = traces[-1].marks
      return (loss, [m.output for m in marks]), (aux, _examples(marks, args), state)

    with jax.named_scope('kfax/forward_backward'):
      (loss, outputs), pullback, (aux, examples, state) = jax.vjp(
          forward, front.params, _accumulators(table, axes), has_aux=True)
      (trace,) = traces
      grads, raw = pullback((jnp.ones_like(loss), [jnp.zeros_like(z) for z in outputs]))
      sampled = grads
      if fisher == 'mc':
        keys = jax.random.split(rng, len(outputs))
        cotangents = [m.sampled_cotangent(k, z) for k, z, m in zip(keys, outputs, trace.marks,
                                                                    strict=True)]
        sampled, raw = pullback((jnp.zeros_like(loss), cotangents))
    front.finish(state)
    stats = {**_combine(table, raw, examples), **_diagonal(table, sampled, examples)}
    return ((loss, aux) if has_aux else loss), grads, stats

  def gauss_newton(x: Any, *args: Any, rng: jax.Array | None = None,
                   **kwargs: Any) -> Callable[[Sequence[Any]], jax.Array]:
    """`gram(tangents) -> (k, k)`: the Gauss-Newton (= Fisher, for kfax's losses) products
    `vᵢᵀ G vⱼ` of the loss at these params (or model) and arguments, for k tangents shaped like
    the gradients. G = Σ Jᵀ H J over the marked outputs, with J their Jacobian in the params and
    H the mean loss's Hessian in them; one linearization, a Jacobian-vector product per
    tangent. `rng` reaches a loss that takes one, as in the call itself."""
    if takes_rng:
      if rng is None:
        raise ValueError(
            'kfax.value_grad_and_stats(...).gauss_newton: the loss takes an `rng` (dropout);'
            ' pass the rng= of this step\'s call, so that the products see its masks.')
      kwargs['rng'] = rng
    front = _front(x, args, kwargs)
    marks: list[_Mark] = []

    def outputs(p):
      with _marking() as found:
        front.apply(loss_fn, p, front.state, None, args, kwargs)
      marks[:] = found.marks
      return [m.output for m in found.marks]

    z, jvp = jax.linearize(outputs, front.params)
    if not marks:
      raise ValueError(
          'kfax.value_grad_and_stats(...).gauss_newton needs the loss to be built from'
          ' kfax.softmax_cross_entropy, kfax.sigmoid_binary_cross_entropy or kfax.squared_error,'
          ' whose Hessians in the model outputs it multiplies by.')

    primals, structure = jax.tree.flatten(front.params)

    def gram(tangents: Sequence[Any]) -> jax.Array:
      def cast(tangent):  # the params' structure (an NNX State of Params) and dtypes
        leaves = jax.tree.leaves(tangent)
        if len(leaves) != len(primals):
          raise ValueError(
              f'kfax gauss_newton: a tangent has {len(leaves)} arrays, the params'
              f' {len(primals)}; pass trees shaped like the gradients.')
        return jax.tree.unflatten(structure, [v.astype(p.dtype) for v, p in zip(leaves, primals)])

      ju = [jvp(cast(t)) for t in tangents]
      hju = [[m.curvature(zm, u) for m, zm, u in zip(marks, z, j)] for j in ju]
      dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(a, b))
      return jnp.stack([jnp.stack([dot(a, hb) for hb in hju]) for a in ju])

    return gram

  value_grad_stats.layers = layers
  value_grad_stats.gauss_newton = gauss_newton
  return value_grad_stats
