"""The Flax NNX front-end of capture: the same layer kinds, table and statistics as for linen.

NNX has no method interceptor, so capture works on a private copy of the model (`nnx.split` /
`nnx.merge`); the user's model is never changed except by the state updates its own loss makes.
In the copy, each layer of a kind in `_kinds.KINDS` gets a subclass of its own class whose
methods report to the running trace, and a static attribute naming its path in the model's
`nnx.Param` state. In the real pass each captured layer also holds its zero accumulators as an
`Accumulator` (an `nnx.Param`), so `nnx.scan`, `nnx.vmap` and `nnx.remat` carry and slice them
with the layer's parameters, and their cotangents are the statistics, exactly as in linen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from kfax import _capture, _kinds

PATH = '_kfax_path'  # a tapped layer's key in the layer table (static: survives split/merge)
ACC = '_kfax_accumulator'


class Accumulator(nnx.Param):
  """A captured layer's zero statistics accumulator, `{role: {statistic: array}}`. A `Param`,
  so that transforms filtering on `nnx.Param` (`nnx.StateAxes`) slice it with the layer."""


@functools.cache
def _tapped(cls: type, row: type, methods: tuple[str, ...]) -> type:
  """`cls` (a subclass of the table row `row`, or `row` itself) with `row`'s `methods`
  reporting to the running trace. For a subclass the tapped row comes right after it in the
  method order, so a subclass that redefines `__call__` around `super().__call__` (a scaled
  embedding) is captured at the row's own call, whose output is the layer's."""
  namespace = {name: _tapped_method(name, getattr(row, name)) for name in methods}
  names = {'__module__': row.__module__, '__qualname__': row.__qualname__}
  tapped_row = type(row.__name__, (row,), {**namespace, **names})
  if cls is row:
    return tapped_row
  return type(cls.__name__, (cls, tapped_row),
              {'__module__': cls.__module__, '__qualname__': cls.__qualname__})


def _tapped_method(name: str, method: Callable) -> Callable:
  @functools.wraps(method)
  def tapped(self, *args, **kwargs):
    trace = _capture.current()
    if trace is None or _kinds.internal():
      return method(self, *args, **kwargs)
    key = getattr(self, PATH)
    acc = getattr(self, ACC, None)
    return trace.call(self, name, lambda found: tuple(key.split('/')) if key else (),
                      lambda *a, **k: method(self, *a, **k), args, kwargs,
                      None if acc is None else acc.get_value())
  return tapped


def _row(module: nnx.Module) -> tuple[type, tuple[str, ...]] | None:
  """The table row class of a module and its methods to tap; a reparameterising wrapper's
  `__call__` is tapped too, so that the layers inside it are known to fall back."""
  found = _kinds.kind_of(module)
  if found is not None:
    return found[0], found[1].methods
  for cls in _kinds.REPARAMETERIZING:
    if isinstance(module, cls):
      return cls, ('__call__',)
  return None


def _key(path: tuple) -> str:
  return '/'.join(map(str, path))


def _is_node(x: Any) -> bool:
  return isinstance(x, nnx.Pytree)


class Model:
  """An nnx model split for capture: `params` (its `nnx.Param` state, differentiated), `state`
  (everything else: batch statistics, RNG counts; and the state of NNX objects among the loss's
  other arguments, an `nnx.Rngs`) and the graph of a tapped copy."""

  def __init__(self, model: nnx.Module, args: tuple, kwargs: dict):
    self.model = model
    self.nodes = tuple(x for x in jax.tree.leaves((args, kwargs), is_leaf=_is_node)
                       if _is_node(x))
    graphdef, self.params, state = nnx.split(model, nnx.Param, ...)
    self.nodes_graphdef, nodes_state = nnx.split(self.nodes)
    self.state = (state, nodes_state)
    copy = nnx.merge(graphdef, self.params, state)
    self.owners: dict[str, str] = {}  # modules with parameters of their own, for the notes
    for path, module in nnx.iter_modules(copy):
      if any(isinstance(v, nnx.Param) for v in vars(module).values()):
        self.owners[_key(path)] = _capture.class_name(module)
      row = _row(module)
      if row is not None:
        object.__setattr__(module, '__class__', _tapped(type(module), *row))
        setattr(module, PATH, _key(path))
    self.graphdef = nnx.split(copy, nnx.Param, ...)[0]

  def prepare(self, trace: Any) -> None:
    """Names every module that owns parameters, so the table can say why one falls back."""
    for key, name in self.owners.items():
      trace.records.setdefault(key, _capture._Record()).module = name

  def apply(self, loss_fn: Callable, params: nnx.State, state: tuple, accs: dict | None,
            args: tuple, kwargs: dict) -> tuple[Any, tuple]:
    """`loss_fn` on a tapped copy holding `params` and `state` (and `accs`, the real pass),
    with copies of the NNX objects among its arguments; returns its output and the copies' new
    non-parameter state. Copies are made in this trace, so the loss may update their state."""
    model = nnx.merge(self.graphdef, params, state[0], copy=True)
    nodes = iter(nnx.merge(self.nodes_graphdef, state[1], copy=True))
    args, kwargs = jax.tree.map(lambda x: next(nodes) if _is_node(x) else x, (args, kwargs),
                                is_leaf=_is_node)
    if accs:
      for _, module in nnx.iter_modules(model):
        key = getattr(module, PATH, None)
        if key in accs:
          setattr(module, ACC, Accumulator(accs[key]))
    out = loss_fn(model, *args, **kwargs)
    copies = tuple(x for x in jax.tree.leaves((args, kwargs), is_leaf=_is_node) if _is_node(x))
    return out, (nnx.split(model, nnx.Param, ...)[2], nnx.state(copies))

  def finish(self, state: tuple) -> None:
    """The loss's state updates (BatchNorm statistics, RNG counts) onto the user's objects."""
    nnx.update(self.model, state[0])
    if self.nodes:
      nnx.update(self.nodes, state[1])
