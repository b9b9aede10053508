"""An ``OptimizerInfo`` table of our optimizers, in the manner of torch's own generic optimizer tests.

PyTorch tests every ``torch.optim`` class with one set of generic tests
(``test/test_optim.py``) run over a table of entries
(``torch.testing._internal.common_optimizers``): per optimizer, the
constructor configurations it supports, the bad inputs it must refuse (error
type and message), and which implementations (for-loop, foreach, fused) it
has. This module is that table for AdamP, SGDP and ``Projected`` around
``torch.optim.AdamW`` / ``torch.optim.SGD`` (written here, not imported: the
torch module is internal and its entries name torch's classes), and
``tests/test_optim_generic.py`` holds the generic tests that run over it.

Implementations (:data:`IMPLS`): ``forloop`` (``foreach=False``, the
reference-order loop), ``foreach`` (``foreach=True``), ``fused`` (``fused=True``:
the native CPU kernel), ``compiled`` (``fused=True`` with the ``torch.compile``
back end forced, as on devices without the kernel; dynamo's ``eager`` backend,
so that it traces the same graph without inductor's code generation) and
``default`` (neither set). ``Projected`` takes the inner optimizer's
``foreach``/``fused`` flags; it has no compiled back end of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import helpers
import torch
from torch import Tensor
from torch.optim import Optimizer

import torch_adamp
from torch_adamp import SGDP, AdamP, Projected, ProjectedOptimizer
from torch_adamp.rule import Options

# ---------------------------------------------------------------------------------------------
# entries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerInput:
    """Constructor keyword arguments (never the implementation flags) and a short description."""

    kwargs: dict[str, Any]
    desc: str

    def __repr__(self) -> str:
        return self.desc


@dataclass(frozen=True)
class ErrorInput:
    """A bad input: ``params`` (``None``: the standard ones) and ``kwargs`` given to the constructor
    (``on="construct"``), to ``add_param_group`` as one group (``"add_param_group"``), or set as a
    gradient/group value before ``step()`` (``"step"``: ``prepare(opt, params)`` makes it bad)."""

    desc: str
    error_type: type[BaseException] | type[Warning]
    match: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    params: Callable[[list[torch.nn.Parameter]], Any] | None = None
    on: str = "construct"
    prepare: Callable[[Optimizer, list[torch.nn.Parameter]], None] | None = None

    def __repr__(self) -> str:
        return self.desc


@dataclass(frozen=True)
class Impl:
    name: str
    kwargs: dict[str, Any]
    compiled: bool = False

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Where the implementation needs it (the forced compile back end), around construction and steps."""
        if not self.compiled:
            yield
            return
        torch._dynamo.reset()
        try:
            with helpers.fused_backend("compile", compiler="eager"):
                yield
        finally:
            torch._dynamo.reset()


IMPLS: dict[str, Impl] = {
    "forloop": Impl("forloop", {"foreach": False}),
    "foreach": Impl("foreach", {"foreach": True}),
    "fused": Impl("fused", {"fused": True}),
    "compiled": Impl("compiled", {"fused": True}, compiled=True),
    "default": Impl("default", {}),
}


@dataclass(frozen=True)
class OptimizerInfo:
    """What the generic tests need to know about one optimizer."""

    name: str
    #: ``make(params, **kwargs)``: kwargs are an input's plus an implementation's flags
    make: Callable[..., Optimizer]
    inputs: Callable[[], list[OptimizerInput]]
    error_inputs: Callable[[], list[ErrorInput]]
    impls: tuple[str, ...]
    #: inputs (by description) the forced compile back end runs: one compile per optimizer and dtype (2-10 s)
    compiled_inputs: tuple[str, ...] = ()
    #: group keys added after the first release (dropped to build an "older" state dict)
    newer_keys: tuple[str, ...] = ()
    #: names of the per-parameter state tensors (besides ``step``)
    state_names: tuple[str, ...] = ()
    supports_complex: bool = False
    has_capturable_arg: bool = False
    #: parameter dtypes the implementations take
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    #: inputs (by description) of the tests that check a mechanism rather than the numbers of every option
    core_inputs: tuple[str, ...] = ()
    #: ``(impl, words of the input description, dtypes (None: all), reason)``: what is not run, and why
    skips: tuple[tuple[str, str, tuple[torch.dtype, ...] | None, str], ...] = ()

    def __repr__(self) -> str:
        return self.name

    def skip_reason(self, impl: str, inp: OptimizerInput, dtype: torch.dtype | None = None) -> str | None:
        for s_impl, words, dtypes, reason in self.skips:
            if s_impl == impl and words in inp.desc and (dtypes is None or dtype in dtypes):
                return reason
        return None

    def supported_inputs(self, impl: str, core: bool = False) -> list[OptimizerInput]:
        inputs = self.inputs()
        if IMPLS[impl].compiled:
            inputs = [i for i in inputs if i.desc in self.compiled_inputs]
        if core:
            inputs = [i for i in inputs if i.desc in self.core_inputs]
        return [i for i in inputs if self.skip_reason(impl, i) is None]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


def _t(x: float) -> Tensor:
    return torch.tensor(x)


def adamp_inputs() -> list[OptimizerInput]:
    return [
        OptimizerInput({}, "default"),
        OptimizerInput({"lr": 0.02}, "non-default lr"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1}, "weight_decay"),
        OptimizerInput({"lr": _t(0.02)}, "tensor lr"),
        OptimizerInput({"lr": _t(0.02), "weight_decay": 0.1}, "tensor lr, weight_decay"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "maximize": True}, "maximize, weight_decay"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "nesterov": True}, "nesterov, weight_decay"),
        OptimizerInput({"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6}, "betas, eps"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "delta": 0.3, "wd_ratio": 0.5}, "delta, wd_ratio"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "scale_invariant": "channel"}, "channel"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "scale_invariant": "layer"}, "layer"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "scale_invariant": False}, "never projected"),
        OptimizerInput({"lr": 0.02, "caution": True}, "caution"),
        OptimizerInput({"lr": 0.02, "fp32_state": False}, "state in the parameter dtype"),
        OptimizerInput({"lr": 0.02, "capturable": True}, "capturable"),
    ]


def sgdp_inputs() -> list[OptimizerInput]:
    return [
        OptimizerInput({"lr": 0.1}, "no momentum"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9}, "momentum"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "dampening": 0.5}, "dampening"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, "weight_decay"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, "nesterov, weight_decay"),
        OptimizerInput({"lr": 0.1, "nesterov": True}, "nesterov without momentum"),
        OptimizerInput({"lr": _t(0.1), "momentum": 0.9, "weight_decay": 0.01}, "tensor lr, weight_decay"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "maximize": True, "weight_decay": 0.01}, "maximize"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "project_momentum": False}, "buffer not projected"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "delta": 0.3, "wd_ratio": 0.5, "weight_decay": 0.01}, "delta"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "scale_invariant": "channel"}, "channel"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "scale_invariant": "layer", "weight_decay": 0.01}, "layer"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "scale_invariant": False}, "never projected"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "caution": True, "project_momentum": False}, "caution"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "fp32_state": False}, "state in the parameter dtype"),
    ]


def projected_adamw_inputs() -> list[OptimizerInput]:
    return [
        OptimizerInput({}, "default"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1}, "weight_decay"),
        OptimizerInput({"lr": _t(0.02), "weight_decay": 0.1}, "tensor lr, weight_decay"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "maximize": True}, "maximize"),
        OptimizerInput({"lr": 0.02, "amsgrad": True}, "amsgrad"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "delta": 0.3, "wd_ratio": 0.5}, "delta, wd_ratio"),
        OptimizerInput({"lr": 0.02, "weight_decay": 0.1, "scale_invariant": "layer"}, "layer"),
    ]


def projected_sgd_inputs() -> list[OptimizerInput]:
    return [
        OptimizerInput({"lr": 0.1}, "no momentum"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "nesterov": True}, "nesterov"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, "coupled weight_decay"),
        OptimizerInput({"lr": _t(0.1), "momentum": 0.9}, "tensor lr"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "maximize": True}, "maximize"),
        OptimizerInput({"lr": 0.1, "momentum": 0.9, "scale_invariant": "channel"}, "channel"),
    ]


# ---------------------------------------------------------------------------------------------
# error inputs
# ---------------------------------------------------------------------------------------------


def _sparse_grad(opt: Optimizer, params: list[torch.nn.Parameter]) -> None:
    params[1].grad = params[1].grad.to_sparse()  # type: ignore[union-attr]


def _two_element_lr(opt: Optimizer, params: list[torch.nn.Parameter]) -> None:
    opt.param_groups[0]["lr"] = torch.tensor([0.01, 0.01])


def common_error_inputs(lr_message: str, lr_word: str = "lr") -> list[ErrorInput]:
    """What torch checks for every optimizer (``get_error_inputs_for_all_optims``), plus ours."""
    return [
        ErrorInput("invalid param type", TypeError, "iterable of Tensors or dicts", params=lambda ps: ps[0]),
        ErrorInput(
            "duplicate params in a group", UserWarning, "duplicate parameters", params=lambda ps: [ps[0], ps[0]]
        ),
        ErrorInput(
            "duplicate params across groups",
            ValueError,
            "more than one parameter group",
            params=lambda ps: [{"params": ps[0]}, {"params": ps[0]}],
        ),
        ErrorInput("empty parameter list", ValueError, "empty parameter list", params=lambda ps: []),
        ErrorInput("2-element tensor lr", ValueError, lr_message, kwargs={"lr": torch.tensor([1e-3, 1e-3])}),
        ErrorInput(
            "params with and without names",
            ValueError,
            "with/without names",
            params=lambda ps: [("weight", ps[0]), ps[1]],
        ),
        ErrorInput(
            "param groups with and without names",
            ValueError,
            "with/without names",
            params=lambda ps: [{"params": [ps[0]]}, {"params": [("weight", ps[1])]}],
        ),
        ErrorInput("negative lr", ValueError, lr_word, kwargs={"lr": -0.1}),
        ErrorInput(
            "complex parameter",
            ValueError,
            "complex",
            params=lambda ps: [ps[0], torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))],
        ),
        ErrorInput(
            "complex parameter in add_param_group",
            ValueError,
            "complex",
            params=lambda ps: [torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))],
            on="add_param_group",
        ),
        ErrorInput(
            "duplicate in add_param_group", ValueError, "more than one", params=lambda ps: [ps[0]], on="add_param_group"
        ),
        ErrorInput("sparse gradient", RuntimeError, "sparse", on="step", prepare=_sparse_grad),
    ]


def adamp_error_inputs() -> list[ErrorInput]:
    return [
        *common_error_inputs("one element"),
        ErrorInput("beta1 = 1", ValueError, "beta", kwargs={"betas": (1.0, 0.999)}),
        ErrorInput("negative eps", ValueError, "eps", kwargs={"eps": -1e-8}),
        ErrorInput("negative weight_decay", ValueError, "weight_decay", kwargs={"weight_decay": -0.1}),
        ErrorInput("negative delta", ValueError, "delta", kwargs={"delta": -0.1}),
        ErrorInput("wd_ratio > 1", ValueError, "wd_ratio", kwargs={"wd_ratio": 1.5}),
        ErrorInput("string nesterov", ValueError, "nesterov", kwargs={"nesterov": "no"}),
        ErrorInput("foreach and fused", ValueError, "foreach and fused", kwargs={"foreach": True, "fused": True}),
        ErrorInput("bad scale_invariant", ValueError, "scale_invariant", kwargs={"scale_invariant": "rows"}),
        ErrorInput("differentiable", TypeError, "differentiable", kwargs={"differentiable": True}),
        ErrorInput("unknown keyword", TypeError, "unexpected keyword", kwargs={"momentum": 0.9}),
        ErrorInput(
            "integer parameter", ValueError, "dtype", params=lambda ps: [ps[0], torch.zeros(3, dtype=torch.int32)]
        ),
        ErrorInput("bad lr in add_param_group", ValueError, "lr", kwargs={"lr": -1.0}, on="add_param_group"),
        ErrorInput("2-element tensor lr set before step", ValueError, "lr", on="step", prepare=_two_element_lr),
    ]


def sgdp_error_inputs() -> list[ErrorInput]:
    return [
        *(e for e in common_error_inputs("one element")),
        ErrorInput("no lr anywhere", ValueError, "lr", kwargs={"lr": None}),
        ErrorInput("negative momentum", ValueError, "momentum", kwargs={"momentum": -0.5}),
        ErrorInput(
            "momentum = 1 with weight decay", ValueError, "momentum", kwargs={"momentum": 1.0, "weight_decay": 0.1}
        ),
        ErrorInput("negative dampening", ValueError, "dampening", kwargs={"dampening": -0.5}),
        ErrorInput("string nesterov", ValueError, "nesterov", kwargs={"nesterov": "no"}),
        ErrorInput("string project_momentum", ValueError, "project_momentum", kwargs={"project_momentum": "yes"}),
        ErrorInput("foreach and fused", ValueError, "foreach and fused", kwargs={"foreach": True, "fused": True}),
        ErrorInput("capturable", TypeError, "capturable", kwargs={"capturable": True}),
        ErrorInput("differentiable", TypeError, "differentiable", kwargs={"differentiable": True}),
        ErrorInput(
            "bad momentum in add_param_group", ValueError, "momentum", kwargs={"momentum": -1.0}, on="add_param_group"
        ),
        ErrorInput("2-element tensor lr set before step", ValueError, "lr", on="step", prepare=_two_element_lr),
    ]


def projected_error_inputs() -> list[ErrorInput]:
    return [
        *common_error_inputs("1-element", "learning rate"),
        ErrorInput("wd_ratio > 1", ValueError, "wd_ratio", kwargs={"wd_ratio": 1.5}),
        ErrorInput("negative delta", ValueError, "delta", kwargs={"delta": -0.1}),
        ErrorInput("bad scale_invariant", ValueError, "scale_invariant", kwargs={"scale_invariant": True}),
        ErrorInput("bad delta in add_param_group", ValueError, "delta", kwargs={"delta": -1.0}, on="add_param_group"),
        ErrorInput("differentiable inner", ValueError, "differentiable", kwargs={"differentiable": True}),
    ]


# ---------------------------------------------------------------------------------------------
# constructors
# ---------------------------------------------------------------------------------------------

#: the keyword arguments of ``Projected`` (the rest go to the inner optimizer); ``projection_eps`` is its ``eps``
PROJECTED_KWARGS = ("delta", "wd_ratio", "projection_eps", "scale_invariant", "track_stats")


def _make_sgdp(params: Any, **kwargs: Any) -> Optimizer:
    if kwargs.get("lr", 0.0) is None:  # "no lr anywhere": SGDP's lr is required
        kwargs.pop("lr")
    return SGDP(params, **kwargs)


def _projected(inner_cls: type[Optimizer]) -> Callable[..., Optimizer]:
    def make(params: Any, **kwargs: Any) -> Optimizer:
        outer = {k: kwargs.pop(k) for k in PROJECTED_KWARGS if k in kwargs}
        if "projection_eps" in outer:
            outer["eps"] = outer.pop("projection_eps")
        if inner_cls is torch.optim.SGD:
            kwargs.setdefault("lr", 0.1)
        return Projected(inner_cls(params, **kwargs), **outer)

    return make


#: torch's own fused CPU kernels in half precision do not agree with torch's for-loop (not ours: measured
#: with the bare torch optimizers, 5 steps of tests/optim_info.py's gradients)
_TORCH_FUSED_HALF = "torch's fused CPU {} in bfloat16/float16 differs from its own for-loop by up to {} abs (measured)"
_HALF = (torch.bfloat16, torch.float16)


ADAMP_INFO = OptimizerInfo(
    "AdamP",
    AdamP,
    adamp_inputs,
    adamp_error_inputs,
    impls=("forloop", "foreach", "fused", "compiled", "default"),
    compiled_inputs=("tensor lr, weight_decay",),
    core_inputs=("tensor lr, weight_decay", "nesterov, weight_decay", "caution"),
    newer_keys=(
        "maximize",
        "foreach",
        "fused",
        "capturable",
        "scale_invariant",
        "track_stats",
        "fp32_state",
        "caution",
        "corrected_weight_decay",
        "lr_max",
    ),
    state_names=("exp_avg", "exp_avg_sq"),
    has_capturable_arg=True,
)
SGDP_INFO = OptimizerInfo(
    "SGDP",
    _make_sgdp,
    sgdp_inputs,
    sgdp_error_inputs,
    impls=("forloop", "foreach", "fused", "compiled", "default"),
    compiled_inputs=("nesterov, weight_decay",),
    core_inputs=("no momentum", "tensor lr, weight_decay", "buffer not projected"),
    newer_keys=(
        "maximize",
        "foreach",
        "fused",
        "capturable",
        "project_momentum",
        "scale_invariant",
        "track_stats",
        "fp32_state",
        "caution",
        "corrected_weight_decay",
        "lr_max",
    ),
    state_names=("momentum",),
)
PROJECTED_ADAMW_INFO = OptimizerInfo(
    "Projected(AdamW)",
    _projected(torch.optim.AdamW),
    projected_adamw_inputs,
    projected_error_inputs,
    impls=("forloop", "foreach", "fused", "default"),
    core_inputs=("weight_decay", "amsgrad"),
    newer_keys=(
        "delta",
        "wd_ratio",
        "projection_eps",
        "scale_invariant",
        "track_stats",
        "corrected_weight_decay",
        "lr_max",
    ),
    state_names=("exp_avg", "exp_avg_sq"),
    has_capturable_arg=True,
    skips=(
        ("foreach", "tensor lr", None, "torch's foreach AdamW refuses a tensor lr unless capturable=True"),
        ("fused", "", _HALF, _TORCH_FUSED_HALF.format("AdamW", 0.047)),
        (
            "foreach",
            "weight_decay",
            _HALF,
            "torch's foreach AdamW with weight decay in bfloat16/float16 differs from its own for-loop by up to "
            "0.078 abs (measured)",
        ),
    ),
)
PROJECTED_SGD_INFO = OptimizerInfo(
    "Projected(SGD)",
    _projected(torch.optim.SGD),
    projected_sgd_inputs,
    projected_error_inputs,
    impls=("forloop", "foreach", "fused", "default"),
    core_inputs=("nesterov", "tensor lr"),
    newer_keys=(
        "delta",
        "wd_ratio",
        "projection_eps",
        "scale_invariant",
        "track_stats",
        "corrected_weight_decay",
        "lr_max",
    ),
    skips=(("fused", "", _HALF, _TORCH_FUSED_HALF.format("SGD", 1.8)),),
)


def rule_info(cls: type[ProjectedOptimizer], name: str | None = None) -> OptimizerInfo:
    """The entry of any optimizer over a rule, derived from its declarations: the constructor's defaults and
    the rule's option fields give the inputs (each of its own options away from its default, and the base
    options every rule has) and the error inputs (a string for a boolean, a negative number for a checked
    number); the rule gives the state names and whether ``fused=True`` has a native kernel (else it is the
    compiled path, run by the "compiled" implementation). A new rule is covered without a table of its own;
    AdamP and SGDP keep their hand-written entries above (older, with their reference's edge cases)."""
    rule = cls.rule
    signature = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in signature.items() if k not in ("self", "params")}
    own = [f.name for f in dataclasses.fields(rule.options_type) if f.name not in _BASE_OPTIONS and f.name in defaults]
    lr = defaults["lr"]

    def inputs() -> list[OptimizerInput]:
        out = [
            OptimizerInput({}, "default"),
            OptimizerInput({"weight_decay": 0.1}, "weight_decay"),
            OptimizerInput({"lr": _t(lr), "weight_decay": 0.1}, "tensor lr, weight_decay"),
            OptimizerInput({"weight_decay": 0.1, "maximize": True}, "maximize, weight_decay"),
            OptimizerInput({"weight_decay": 0.1, "delta": 0.3, "wd_ratio": 0.5}, "delta, wd_ratio"),
            OptimizerInput({"weight_decay": 0.1, "scale_invariant": "channel"}, "channel"),
            OptimizerInput({"weight_decay": 0.1, "scale_invariant": "layer"}, "layer"),
            OptimizerInput({"weight_decay": 0.1, "scale_invariant": False}, "never projected"),
            OptimizerInput({"caution": True}, "caution"),
            OptimizerInput({"fp32_state": False}, "state in the parameter dtype"),
        ]
        for key in own:
            value = defaults[key]
            other = (not value) if isinstance(value, bool) else (value * 0.5 if value else 0.5)
            out.append(OptimizerInput({"weight_decay": 0.1, key: other}, f"{key}={other!r}"))
        return out

    def error_inputs() -> list[ErrorInput]:
        out = [
            *common_error_inputs("one element"),
            ErrorInput("negative eps", ValueError, "eps", kwargs={"eps": -1e-8}),
            ErrorInput("negative weight_decay", ValueError, "weight_decay", kwargs={"weight_decay": -0.1}),
            ErrorInput("wd_ratio > 1", ValueError, "wd_ratio", kwargs={"wd_ratio": 1.5}),
            ErrorInput("foreach and fused", ValueError, "foreach and fused", kwargs={"foreach": True, "fused": True}),
            ErrorInput("bad scale_invariant", ValueError, "scale_invariant", kwargs={"scale_invariant": "rows"}),
            ErrorInput("string caution", ValueError, "caution", kwargs={"caution": "no"}),
            ErrorInput("2-element tensor lr set before step", ValueError, "lr", on="step", prepare=_two_element_lr),
        ]
        for key in own:
            bad: Any = "no" if isinstance(defaults[key], bool) else -0.5
            out.append(ErrorInput(f"bad {key}", ValueError, key, kwargs={key: bad}))
            out.append(
                ErrorInput(f"bad {key} in add_param_group", ValueError, key, kwargs={key: bad}, on="add_param_group")
            )
        return out

    native_kernel = "native" in rule.kernels
    return OptimizerInfo(
        name or cls.__name__,
        cls,
        inputs,
        error_inputs,
        impls=("forloop", "foreach", *(("fused",) if native_kernel else ()), "compiled", "default"),
        compiled_inputs=("tensor lr, weight_decay",),
        core_inputs=("tensor lr, weight_decay", "caution"),
        state_names=rule.state_names,
        has_capturable_arg="capturable" in defaults,
    )


#: the options every rule has (from ``torch_adamp.rule.Options``): the derived inputs vary the others
_BASE_OPTIONS = {f.name for f in dataclasses.fields(Options)}


def _example_rule() -> type[ProjectedOptimizer]:
    """The worked example of the extension point (examples/custom_rule.py), a rule defined outside the package."""
    cls: type[ProjectedOptimizer] = helpers.example("custom_rule").RMSpropP
    return cls


#: every other projected optimizer torch_adamp exports, and the example's: derived from their rules
DERIVED_INFOS = [
    *(
        rule_info(getattr(torch_adamp, name))
        for name in torch_adamp.__all__
        if isinstance(getattr(torch_adamp, name), type)
        and issubclass(getattr(torch_adamp, name), ProjectedOptimizer)
        and getattr(torch_adamp, name) not in (ProjectedOptimizer, AdamP, SGDP)
    ),
    rule_info(_example_rule(), "RMSpropP (examples/custom_rule.py)"),
]

OPTIM_INFOS = [ADAMP_INFO, SGDP_INFO, *DERIVED_INFOS, PROJECTED_ADAMW_INFO, PROJECTED_SGD_INFO]
#: our own classes (the projected wrappers inherit the rest of their behaviour from torch)
OWN_INFOS = [ADAMP_INFO, SGDP_INFO, *DERIVED_INFOS]


# ---------------------------------------------------------------------------------------------
# parameters and gradients
# ---------------------------------------------------------------------------------------------

#: conv-like, matrix, vector, scalar: every decision of the projection, and never-projected tensors
SHAPES: list[tuple[int, ...]] = [(6, 3, 2, 2), (5, 8), (7,), ()]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]


def gradients(params: list[Tensor], step: int, seed: int = 1) -> list[Tensor]:
    """Per tensor and step: orthogonal to each row of ``w`` (the channel view passes), to the whole of
    ``w`` (the layer view passes), or random (no projection): every decision occurs on every path."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        w = p.detach().double()
        kind = (i + step) % 3
        if p.dim() > 1 and kind < 2:
            rows = w.reshape(w.shape[0] if kind == 0 else 1, -1)
            g2 = g.reshape_as(rows)
            g2 = g2 - (g2 * rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True) * rows
            g = g2.reshape(p.shape)
        out.append(g.to(p.dtype))
    return out


def set_grads(params: list[Tensor], step: int, seed: int = 1) -> None:
    for p, g in zip(params, gradients(params, step, seed), strict=True):
        p.grad = g
