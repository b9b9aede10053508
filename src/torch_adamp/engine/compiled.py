"""The compile back end: ``torch.compile(fullgraph=True, dynamic=False)`` of the multi-tensor path.

What ``fused=True`` runs where the rule has no kernel for the bucket's device (or the workspace's back end
says ``"compile"``): one compiled function per rule and tensor signature (shapes, dtypes, devices), kept
by the optimizer's workspace (the functional API's by this module), each compiled once and reused for
every later step; ``lr`` is passed as a tensor, so a new value is data, not a recompilation.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..rule import Options, Rule
from . import paths, tail
from .bundle import Bundle
from .workspace import Workspace

#: compiled steps of callers without a workspace (the functional API), by compiler, rule and signature
_compiled: dict[Any, Callable[..., Any]] = {}


def _multi_tensor(
    rule: Rule[Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[list[Tensor]],
    steps: list[Tensor] | None,
    o: Options,
    views: tail.Views,
) -> None:
    paths.multi_tensor(rule, Bundle(params, grads, states, steps), o, views)


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` with a code object of its own: dynamo keeps its cache, and counts its recompile limit,
    per code object, so each compiled step gets one (a group of one optimizer, not every group of the process)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _compiled_fn(rule: Rule[Any], params: Sequence[Tensor], workspace: Workspace | None, compiler: Any) -> Any:
    if torch.compiler.is_compiling():
        return _multi_tensor  # inside an outer torch.compile: trace into the caller's graph
    cache = workspace.compiled if workspace is not None else _compiled
    key: tuple[Any, ...] = (rule.name, tuple((tuple(p.shape), p.dtype, p.device) for p in params))
    if workspace is None:
        key = (compiler, *key)
    fn = cache.get(key)
    if fn is None:
        fn = cache[key] = torch.compile(_own_code(_multi_tensor), fullgraph=True, dynamic=False, backend=compiler)
    return fn


def _tensor_lr(lr: float | Tensor) -> Tensor:
    """``lr`` as a 0-d tensor, so that a new value is data, not a recompilation."""
    return lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float32)


def step(rule: Rule[Any], t: Bundle, o: Options, views: tail.Views, workspace: Workspace | None, compiler: Any) -> None:
    """The compiled multi-tensor step of one device/dtype bucket (``compiler``: ``torch.compile``'s backend)."""
    o_t = dataclasses.replace(o, lr=_tensor_lr(o.lr))
    states = [list(s) for s in t.states]
    steps = list(t.steps) if t.steps is not None else None
    fn = _compiled_fn(rule, t.params, workspace, compiler)
    fn(rule, list(t.params), list(t.grads), states, steps, o_t, views)
