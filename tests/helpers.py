"""Shared test utilities: the implementation paths, tiny models, and the differential harness.

Everything here is deterministic on CPU (fixed seeds, fixed batches), small
(a few thousand parameters) and cheap, so that the whole suite runs in
minutes on two cores.

* :data:`PATHS` / :func:`path_kwargs`: the one list of implementation paths.
* :data:`ARCHITECTURES` / :func:`make_model`: tiny models covering the shapes
  the projection must handle (conv + BN, linear + LN, plain MLP, grouped /
  depthwise conv, Conv1d / Conv3d, Embedding, weight standardisation and
  weight norm, tensors whose dim 0 is 1), each with a loss on fixed batches.
* :func:`scale_invariant_objective`: a smooth function that is exactly
  scale-invariant per row or per tensor (for property tests).
* :data:`BASE_OPTIONS`, :data:`OPTION_SETS`, :data:`LARGE_LR_OPTION_SETS`: the
  option combinations of the differential tests (:class:`OptionSet`).
* :func:`make_reference` / :func:`make_ours`: an ``adamp==0.3.0`` optimizer and
  one of ours with the same options (parameter groups included).
* :func:`record_reference_views` / :func:`our_views`: the projection view
  (none / channel / layer) each parameter got at the last step, for the
  reference (by instrumenting the instance) and for ours (``opt.stats()``).
* :func:`run_lockstep`: trains the reference and several paths of ours side by
  side, free-running, each on its own copy of the model, and records decision
  mismatches and parameter differences. :func:`run_synced`: the same, one step
  at a time from identical states (for chaotic, large-lr settings).
* :func:`rel_diff`: the relative metric used throughout,
  ``||ours - ref||_2 / ||ref||_2`` per tensor.
* :func:`one_thread`: body of a fixture running tests with one intra-op thread.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import adamp as reference
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_adamp

# --------------------------------------------------------------------------------------
# Implementation paths
# --------------------------------------------------------------------------------------

#: the implementation paths of our optimizers and the constructor options selecting them
PATHS: dict[str, dict[str, bool]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}

#: codes of the projection view in ``opt.stats()["<name>/view"]`` (see ``torch_adamp.projection``)
NONE, CHANNEL, LAYER = 0, 1, 2
VIEW_CODES = {"none": NONE, "channel": CHANNEL, "layer": LAYER}


def path_kwargs(path: str) -> dict[str, bool]:
    """Constructor options of ``path``."""
    return dict(PATHS[path])


# --------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------


class WSConv2d(nn.Conv2d):
    """Conv2d with weight standardisation: per output channel, zero mean and unit norm.

    The loss is exactly invariant to ``w[i] -> c_i * w[i]`` (``c_i > 0``), so
    the gradient of each output channel is orthogonal to its weight row.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        flat = flat - flat.mean(dim=1, keepdim=True)
        flat = flat / flat.norm(dim=1, keepdim=True)
        return self._conv_forward(x, flat.reshape_as(w), self.bias)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class LinearLN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(12, 32)
        self.n1 = nn.LayerNorm(32)
        self.l2 = nn.Linear(32, 32, bias=False)
        self.n2 = nn.LayerNorm(32, elementwise_affine=False)
        self.out = nn.Linear(32, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.n1(self.l1(x)))
        x = F.gelu(self.n2(self.l2(x)))
        return self.out(x)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 5))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GroupedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise: weight (8, 1, 3, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.gc = nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False)  # grouped: weight (12, 2, 3, 3)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.dw(self.stem(x))))
        x = F.relu(self.bn2(self.gc(x)))
        return self.fc(x.mean(dim=(2, 3)))


class Conv1d3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)  # weight (8, 3, 3)
        self.gn = nn.GroupNorm(2, 8)
        self.c3 = nn.Conv3d(3, 6, 2, bias=False)  # weight (6, 3, 2, 2, 2)
        self.bn = nn.BatchNorm3d(6)
        self.fc = nn.Linear(14, 5)

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 3, 4, 4, 4); the Conv1d branch sees it flattened to length 64
        a = F.relu(self.gn(self.c1(x.flatten(2)))).mean(dim=2)
        b = F.relu(self.bn(self.c3(x))).mean(dim=(2, 3, 4))
        return self.fc(torch.cat([a, b], dim=1))


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 12)  # only the rows seen in a batch get gradient
        self.l1 = nn.Linear(12, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.l1(self.emb(x).mean(dim=1))))


class NormedWeights(nn.Module):
    """A weight-standardised conv and a weight-normed linear (``original1`` is scale-invariant)."""

    def __init__(self) -> None:
        super().__init__()
        self.ws = WSConv2d(3, 8, 3, padding=1, bias=False)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(8, 16))
        self.out = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.ws(x)).mean(dim=(2, 3))
        return self.out(torch.tanh(self.wn(x)))


class DimZeroOne(nn.Module):
    """Tensors whose dim 0 is 1 (channel view == layer view): a (1, 3, 3, 3) conv and a (1, 12) gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)  # weight (1, 3, 3, 3), scale-invariant
        self.bn = nn.BatchNorm2d(1, affine=False)
        self.proj = nn.Linear(16, 12)
        self.gate = nn.Parameter(torch.randn(1, 12) * 0.5)  # (1, 12), not scale-invariant
        self.head = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x)).flatten(1)  # (N, 16) for 4x4 images
        return self.head(torch.tanh(self.proj(y)) * self.gate)


@dataclass
class Arch:
    """A model factory with its fixed data and loss."""

    build: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator, torch.dtype], tuple[Tensor, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy


def _images(size: int) -> Callable[[torch.Generator, torch.dtype], tuple[Tensor, Tensor]]:
    def make(gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return torch.randn(6, 3, size, size, generator=gen).to(dtype), torch.randint(0, 5, (6,), generator=gen)

    return make


def _vectors(gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.randn(8, 12, generator=gen).to(dtype), torch.randint(0, 5, (8,), generator=gen)


def _volumes(gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.randn(4, 3, 4, 4, 4, generator=gen).to(dtype), torch.randint(0, 5, (4,), generator=gen)


def _tokens(gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 40, (8, 5), generator=gen), torch.randint(0, 5, (8,), generator=gen)


#: name -> tiny model with its data; every model has a few hundred to a few thousand parameters
ARCHITECTURES: dict[str, Arch] = {
    "conv_bn": Arch(ConvBN, _images(6)),
    "linear_ln": Arch(LinearLN, _vectors),
    "mlp": Arch(MLP, _vectors),
    "grouped_conv": Arch(GroupedConv, _images(6)),
    "conv1d_conv3d": Arch(Conv1d3d, _volumes),
    "embedding": Arch(EmbeddingModel, _tokens),
    "normed_weights": Arch(NormedWeights, _images(5)),
    "dim0_one": Arch(DimZeroOne, _images(4)),
}

N_BATCHES = 4


def make_model(
    arch: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[nn.Module, Callable[[int], Tensor]]:
    """``(model, loss_at)``: the model in ``dtype`` and ``loss_at(step)`` on a fixed cycle of batches.

    ``loss_at`` evaluates the loss of *that* model (use :func:`loss_fn` for a copy).
    """
    spec = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = spec.build().to(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [spec.make_batch(gen, dtype) for _ in range(N_BATCHES)]
    model.batches = batches  # type: ignore[assignment]
    return model, loss_fn(model, arch)


def loss_fn(model: nn.Module, arch: str) -> Callable[[int], Tensor]:
    """The loss of ``model`` on the batch of ``step`` (batches are stored on the model by :func:`make_model`)."""
    spec = ARCHITECTURES[arch]
    batches = model.batches

    def loss_at(step: int) -> Tensor:
        x, y = batches[step % len(batches)]
        return spec.loss(model(x), y)

    return loss_at


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def scale_invariant_objective(
    shape: tuple[int, ...], view: str, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> Callable[[Tensor], Tensor]:
    """A smooth function ``f(W)`` of a weight of ``shape`` that is exactly scale-invariant.

    ``view="channel"``: ``f`` depends on each row ``W_i`` only through ``W_i / ||W_i||``
    (invariant to ``W_i -> c_i W_i``, so each row of the gradient is orthogonal to
    its row of ``W``); ``view="layer"``: only through ``W / ||W||``. ``f`` is a sum
    of a quadratic and a linear form of the normalised weight, random but fixed by ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = shape[0] if view == "channel" else 1
    d = math.prod(shape) // rows
    a = (torch.randn(rows, d, d, generator=gen) / math.sqrt(d)).to(dtype)
    b = torch.randn(rows, d, generator=gen).to(dtype)

    def f(w: Tensor) -> Tensor:
        x = w.reshape(rows, d)
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return 0.5 * torch.einsum("rij,rj->ri", a, x).square().sum() + (b * x).sum()

    return f


# --------------------------------------------------------------------------------------
# Optimizers and parameter groups
# --------------------------------------------------------------------------------------

#: minimal realistic options of each optimizer (``lr`` is required by SGDP)
BASE_OPTIONS: dict[str, dict[str, Any]] = {"adamp": {"lr": 1e-3}, "sgdp": {"lr": 0.01, "momentum": 0.9}}


@dataclass(frozen=True)
class OptionSet:
    """Options of one optimizer run: ``kind`` (``"adamp"``/``"sgdp"``), constructor options, per-group overrides."""

    kind: str
    options: dict[str, Any]
    #: per-group overrides; the parameters are dealt round-robin over the groups (None: one group)
    groups: list[dict[str, Any]] | None = None


#: option sets of the differential tests, at learning rates where 100 steps of the tiny models
#: are well conditioned (a 1-ulp perturbation of the initial weights moves the reference itself
#: by < 1e-6 relative). Together they cover nesterov on/off x weight decay on/off, delta,
#: wd_ratio (0, 0.5, 1), eps, betas, momentum with and without dampening, and groups with
#: different values of every option.
OPTION_SETS: dict[str, OptionSet] = {
    "adamp-default": OptionSet("adamp", {"lr": 1e-3}),
    "adamp-nesterov-wd": OptionSet("adamp", {"lr": 1e-3, "nesterov": True, "weight_decay": 1e-2}),
    "adamp-delta-wdratio-betas": OptionSet(
        "adamp", {"lr": 1e-3, "weight_decay": 5e-2, "wd_ratio": 0.5, "delta": 0.3, "betas": (0.8, 0.99)}
    ),
    "adamp-strict-eps": OptionSet(
        "adamp", {"lr": 1e-3, "nesterov": True, "weight_decay": 1e-2, "wd_ratio": 0.0, "delta": 0.05, "eps": 1e-6}
    ),
    "adamp-groups": OptionSet(
        "adamp",
        {"lr": 1e-3, "weight_decay": 1e-2},
        [
            {},
            {"lr": 5e-4, "nesterov": True, "weight_decay": 0.0, "delta": 0.2, "wd_ratio": 1.0, "betas": (0.85, 0.995)},
        ],
    ),
    "sgdp-plain": OptionSet("sgdp", {"lr": 0.01}),
    "sgdp-nesterov-wd": OptionSet("sgdp", {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    "sgdp-momentum-dampening": OptionSet("sgdp", {"lr": 0.01, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3}),
    "sgdp-delta-wdratio": OptionSet(
        "sgdp",
        {"lr": 0.02, "momentum": 0.5, "dampening": 0.5, "weight_decay": 1e-3, "wd_ratio": 0.5, "delta": 0.3},
    ),
    "sgdp-groups": OptionSet(
        "sgdp",
        {"lr": 0.01, "momentum": 0.9, "nesterov": True},
        [{}, {"lr": 0.005, "momentum": 0.8, "nesterov": False, "dampening": 0.2, "weight_decay": 1e-3, "delta": 0.05}],
    ),
}

#: large learning rates (the reference README's SGDP setting, AdamP at 1e-2): free-running
#: trajectories of tiny models are chaotic there (a 1-ulp perturbation of the reference's own
#: initial weights moves it by up to ~0.3 relative in 100 steps), so only the bitwise path is
#: compared free-running; the others are compared step by step from identical states.
LARGE_LR_OPTION_SETS: dict[str, OptionSet] = {
    "sgdp-readme": OptionSet("sgdp", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-5}),
    "sgdp-project-buffer": OptionSet("sgdp", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}),
    "adamp-lr1e-2": OptionSet("adamp", {"lr": 1e-2, "weight_decay": 1e-2}),
}


def param_groups(model: nn.Module, groups: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Split the parameters of ``model`` round-robin over ``len(groups)`` groups with those options.

    ``groups=None`` gives a single group with no overrides.
    """
    params = list(model.parameters())
    groups = groups or [{}]
    return [{"params": params[i :: len(groups)], **opts} for i, opts in enumerate(groups)]


def make_reference(kind: str, model: nn.Module, options: dict[str, Any], groups: list[dict[str, Any]] | None = None):
    """``adamp.AdamP`` or ``adamp.SGDP`` on ``model`` with ``options``; options it does not have are dropped."""
    cls = {"adamp": reference.AdamP, "sgdp": reference.SGDP}[kind]
    accepted = inspect.signature(cls.__init__).parameters
    opts = {k: v for k, v in options.items() if k in accepted}
    return cls(param_groups(model, groups), **opts)


def make_ours(kind: str, model: nn.Module, options: dict[str, Any], groups: list[dict[str, Any]] | None = None):
    """``torch_adamp.AdamP`` or ``torch_adamp.SGDP`` on ``model`` with ``options``."""
    cls = {"adamp": torch_adamp.AdamP, "sgdp": torch_adamp.SGDP}[kind]
    return cls(param_groups(model, groups), **options)


def record_reference_views(opt: torch.optim.Optimizer) -> dict[int, str]:
    """Instrument a reference optimizer *instance* to record its projection decisions.

    Returns a dict, filled during each ``step()``: ``id(param) -> "none" |
    "channel" | "layer"`` for each parameter the step saw with a gradient of
    at least 2 dimensions (clear it between steps). The decision is the
    reference's own: the cosine values it computed, compared with its
    threshold expression; each call also stores the margin
    ``(max cos - threshold) / threshold`` under ``("margin", id(p), view)``.
    """
    views: dict[Any, Any] = {}
    orig_cos = opt._cosine_similarity
    orig_proj = opt._projection
    current: list[Any] = []

    def cosine_similarity(x: Tensor, y: Tensor, eps: float, view_func: Callable[[Tensor], Tensor]) -> Tensor:
        cos = orig_cos(x, y, eps, view_func)
        current.append((view_func, cos.max().item(), view_func(y).size(1)))
        return cos

    def projection(p: Tensor, grad: Tensor, perturb: Tensor, delta: float, wd_ratio: float, eps: float):
        current.clear()
        out = orig_proj(p, grad, perturb, delta, wd_ratio, eps)
        decision = "none"
        for view_func, cos_max, row_len in current:
            name = "channel" if view_func == opt._channel_view else "layer"
            threshold = delta / math.sqrt(row_len)
            views["margin", id(p), name] = (cos_max - threshold) / threshold
            if cos_max < threshold:
                decision = name
                break
        views[id(p)] = decision
        return out

    opt._cosine_similarity = cosine_similarity
    opt._projection = projection
    return views


def our_views(opt: torch.optim.Optimizer) -> dict[int, int]:
    """``id(param) -> view code`` of the last step, from the public ``opt.stats()`` (needs ``track_stats=True``).

    Parameters without a gradient at the last step are absent.
    """
    stats = opt.stats()
    out = {}
    for gi, group in enumerate(opt.param_groups):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            key = f"{names[i] if names is not None else f'group{gi}.param{i}'}/view"
            if key in stats:
                out[id(p)] = int(stats[key])
    return out


# --------------------------------------------------------------------------------------
# Metrics and the lock-step driver
# --------------------------------------------------------------------------------------


def rel_diff(ours: Tensor, ref: Tensor) -> float:
    """``||ours - ref||_2 / ||ref||_2`` in float64 (0 if both are exactly equal)."""
    ours, ref = ours.detach().double(), ref.detach().double()
    num = torch.linalg.vector_norm(ours - ref).item()
    if num == 0.0:
        return 0.0
    return num / max(torch.linalg.vector_norm(ref).item(), 1e-300)


def max_rel_diff(ours: Iterable[Tensor], ref: Iterable[Tensor]) -> float:
    """Largest :func:`rel_diff` over paired tensors."""
    return max((rel_diff(a, b) for a, b in zip(ours, ref, strict=True)), default=0.0)


def _step_model(model: nn.Module, loss_at: Callable[[int], Tensor], opt: torch.optim.Optimizer, step: int) -> None:
    opt.zero_grad(set_to_none=True)
    loss_at(step).backward()
    opt.step()


def _mismatch_margin(ref_views: dict[Any, Any], rp: Tensor) -> float:
    """Smallest ``|max cos - threshold| / threshold`` of the reference's tests on ``rp`` this step."""
    margins = [ref_views.get(("margin", id(rp), v), math.nan) for v in ("channel", "layer")]
    return min((abs(m) for m in margins if not math.isnan(m)), default=math.nan)


_VIEW_NAMES = {code: name for name, code in VIEW_CODES.items()}


@dataclass
class Mismatch:
    """A step where our projection view differed from the reference's."""

    path: str
    step: int
    name: str
    ours: str
    reference: str
    #: ``|max cos - threshold| / threshold`` of the reference's test (a tie when ~ rounding)
    margin: float


@dataclass
class LockstepResult:
    """What :func:`run_lockstep` measured, per path (dicts are keyed by path name)."""

    #: largest per-tensor relative difference :func:`rel_diff` after the last step
    final_rel: dict[str, float] = field(default_factory=dict)
    #: name of the tensor with that largest final difference
    worst: dict[str, str] = field(default_factory=dict)
    #: largest relative difference of the whole model (all parameters as one vector) over all steps;
    #: per tensor only the final difference is kept (a bias passing through zero has a relative
    #: difference without meaning at that moment)
    max_model_rel: dict[str, float] = field(default_factory=dict)
    #: first step after which the parameters of a path were not bitwise equal (None: always equal)
    first_inexact: dict[str, int | None] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    #: how many (step, parameter) decisions of each view the reference took
    decision_counts: dict[str, int] = field(default_factory=dict)


def run_lockstep(
    kind: str,
    arch: str,
    options: dict[str, Any],
    paths: Iterable[str],
    *,
    groups: list[dict[str, Any]] | None = None,
    dtype: torch.dtype = torch.float32,
    steps: int = 100,
) -> LockstepResult:
    """Train the reference and each of our ``paths`` side by side for ``steps`` steps.

    Each optimizer has its own copy of the same initial model and sees the real
    gradients of its own model on the same fixed batches (free-running: rounding
    differences compound). After every step the projection view of every
    parameter of ours (``track_stats``) is compared with the reference's
    decision of the same step, and the parameters are compared.
    """
    ref_model, ref_loss = make_model(arch, dtype)
    names = {id(p): n for n, p in ref_model.named_parameters()}
    ref_opt = make_reference(kind, ref_model, options, groups)
    ref_views = record_reference_views(ref_opt)
    ours = {}
    for path in paths:
        model = clone_model(ref_model)
        opt = make_ours(kind, model, {**options, **path_kwargs(path), "track_stats": True}, groups)
        ours[path] = (model, opt, loss_fn(model, arch))

    result = LockstepResult(
        final_rel=dict.fromkeys(ours, 0.0),
        max_model_rel=dict.fromkeys(ours, 0.0),
        first_inexact=dict.fromkeys(ours),
        decision_counts=dict.fromkeys(VIEW_CODES, 0),
    )
    ref_params = list(ref_model.parameters())
    for step in range(steps):
        ref_views.clear()
        _step_model(ref_model, ref_loss, ref_opt, step)
        wanted = [ref_views.get(id(rp), "none") for rp in ref_params]
        for decision in wanted:
            result.decision_counts[decision] += 1
        ref_flat = torch.cat([rp.detach().double().flatten() for rp in ref_params]) if ref_params else None
        for path, (model, opt, loss_at) in ours.items():
            _step_model(model, loss_at, opt, step)
            views = our_views(opt)
            params = list(model.parameters())
            for rp, p, want in zip(ref_params, params, wanted, strict=True):
                got = _VIEW_NAMES[views[id(p)]]
                if got != want:
                    result.mismatches.append(
                        Mismatch(path, step, names[id(rp)], got, want, _mismatch_margin(ref_views, rp))
                    )
            if result.first_inexact[path] is None and not all(
                torch.equal(p, rp) for rp, p in zip(ref_params, params, strict=True)
            ):
                result.first_inexact[path] = step
            if result.first_inexact[path] is not None:
                flat = torch.cat([p.detach().double().flatten() for p in params])
                result.max_model_rel[path] = max(result.max_model_rel[path], rel_diff(flat, ref_flat))
    for path, (model, _, _) in ours.items():
        rels = {names[id(rp)]: rel_diff(p, rp) for rp, p in zip(ref_params, model.parameters(), strict=True)}
        result.worst[path] = max(rels, key=rels.__getitem__)
        result.final_rel[path] = rels[result.worst[path]]
    return result


@dataclass
class SyncedResult:
    """What :func:`run_synced` measured."""

    #: largest per-tensor relative parameter difference after one step from identical states
    max_rel: float = 0.0
    #: (step, parameter name) of that largest difference
    worst: tuple[int, str] | None = None
    mismatches: list[Mismatch] = field(default_factory=list)
    #: how many (step, parameter) decisions of each view the reference took
    decision_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VIEW_CODES, 0))
    #: (step, name, relative difference) where the reference did not project and ours was not bitwise equal
    inexact_unprojected: list[tuple[int, str, float]] = field(default_factory=list)


def _sync_state(ref_opt: torch.optim.Optimizer, opt: torch.optim.Optimizer, pairs: list[tuple[Tensor, Tensor]]) -> None:
    """Copy the per-parameter state of a reference optimizer into ours (same values, our formats)."""
    for rp, p in pairs:
        for key, value in ref_opt.state.get(rp, {}).items():
            mine = opt.state[p][key]
            if isinstance(value, Tensor):
                mine.copy_(value)
            else:
                mine.fill_(value)


def run_synced(
    kind: str,
    arch: str,
    options: dict[str, Any],
    path: str,
    *,
    groups: list[dict[str, Any]] | None = None,
    dtype: torch.dtype = torch.float32,
    steps: int = 100,
) -> SyncedResult:
    """Compare one step at a time from identical states, along the reference trajectory.

    Before every step our model and optimizer state are overwritten with the
    reference's, so rounding differences cannot compound: this isolates the
    per-step error and checks decisions on identical inputs, even where the
    free-running dynamics are chaotic (large learning rates).
    """
    ref_model, ref_loss = make_model(arch, dtype)
    model = clone_model(ref_model)
    loss_at = loss_fn(model, arch)
    names = [n for n, _ in ref_model.named_parameters()]
    ref_opt = make_reference(kind, ref_model, options, groups)
    ref_views = record_reference_views(ref_opt)
    opt = make_ours(kind, model, {**options, **path_kwargs(path), "track_stats": True}, groups)
    pairs = list(zip(ref_model.parameters(), model.parameters(), strict=True))
    result = SyncedResult()
    for step in range(steps):
        with torch.no_grad():
            model.load_state_dict(ref_model.state_dict())
        _sync_state(ref_opt, opt, pairs)
        ref_views.clear()
        _step_model(ref_model, ref_loss, ref_opt, step)
        _step_model(model, loss_at, opt, step)
        views = our_views(opt)
        for name, (rp, p) in zip(names, pairs, strict=True):
            rel = rel_diff(p, rp)
            if result.worst is None or rel > result.max_rel:
                result.max_rel, result.worst = rel, (step, name)
            want = ref_views.get(id(rp), "none")
            result.decision_counts[want] += 1
            if want == "none" and rel != 0.0:
                result.inexact_unprojected.append((step, name, rel))
            got = _VIEW_NAMES[views[id(p)]]
            if got != want:
                result.mismatches.append(Mismatch(path, step, name, got, want, _mismatch_margin(ref_views, rp)))
    return result


def one_thread() -> Iterable[None]:
    """Generator for a fixture: run with one intra-op thread, then restore.

    The models are tiny; with several threads per process (and ``pytest -n``
    workers on few cores) OpenMP spinning costs far more than the work.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Address:
    def __init__(self, start: int, numel: int) -> None:
        self.start, self.numel = start, numel


class _Mapping:
    """What DeepSpeed ZeRO-1/2 puts on a parameter (``_hp_mapping``), for one rank holding everything."""

    def __init__(self, flat: torch.Tensor, start: int, numel: int) -> None:
        self.lp_fragment_address = _Address(0, numel)
        self.hp_fragment_address = _Address(start, numel)
        self.hp_fragment = flat.narrow(0, start, numel)


def one_rank_zero_partition(params: list[torch.nn.Parameter], mapped: bool = True) -> torch.nn.Parameter:
    """The flat partition DeepSpeed ZeRO-1/2 would hand one rank holding every parameter of ``params``
    (``mapped``: with the ``_hp_mapping`` / ``_dp_group`` attributes it puts on the model's parameters)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params if mapped else []:
        p._hp_mapping = _Mapping(flat, offset, p.numel())  # type: ignore[attr-defined]
        p._dp_group = "dp"  # type: ignore[attr-defined]
        offset += p.numel()
    return torch.nn.Parameter(flat)


@contextlib.contextmanager
def fused_backend(fused: str = "auto", *opts: Any, compiler: Any = None) -> Iterator[None]:
    """Optimizers built inside, and ``opts`` (built before) for the duration, take this back end for
    ``fused=True`` (what ``TORCH_ADAMP_FUSED`` chooses when an optimizer is built), with ``compiler`` as the
    compile back end's ``torch.compile`` backend (``None``: the one already in force, e.g. an enclosing
    :func:`counting_compile_backend`'s)."""
    from torch_adamp.engine import workspace

    old = workspace.Backend.from_env
    backend = workspace.Backend(fused, old().compiler if compiler is None else compiler)
    saved = [opt._workspace.backend for opt in opts]
    workspace.Backend.from_env = staticmethod(lambda: backend)  # type: ignore[method-assign]
    for opt in opts:
        opt._workspace.backend = backend
    try:
        yield
    finally:
        workspace.Backend.from_env = old  # type: ignore[method-assign]
        for opt, b in zip(opts, saved, strict=True):
            opt._workspace.backend = b


@contextlib.contextmanager
def counting_compile_backend(fused: str = "auto") -> Iterator[Any]:
    """Dynamo's counting ``eager`` backend as the compile back end's for optimizers built inside (fast; counts
    the compilations), ``fused`` their back end (``"compile"`` forces it on the CPU)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        with fused_backend(fused, compiler=counter):
            yield counter
    finally:
        torch._dynamo.reset()


def small_params(seed: int = 0) -> list[torch.nn.Parameter]:
    """A conv-like weight, a matrix, a vector and a scalar (every decision and never-projected tensors)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4, 3, 3), (5, 7), (7,), ()]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def random_grads(params: list[torch.nn.Parameter], seed: int) -> None:
    """Random gradients for ``params``, the same for a seed."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


#: AdamP and SGDP with weight decay (SGDP with momentum), on whatever path the keywords choose
SMALL_MAKERS: dict[str, Any] = {
    "adamp": lambda ps, **kw: torch_adamp.AdamP(ps, lr=1e-2, weight_decay=0.1, **kw),
    "sgdp": lambda ps, **kw: torch_adamp.SGDP(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw),
}


@functools.cache
def example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module, loaded once per process (a rule it defines registers once)."""
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def interpret_triton_faster() -> None:
    """Make Triton's interpreter (``TRITON_INTERPRET=1``) about twice as fast on the Triton back end's kernels.

    At every call of a ``@triton.jit`` helper the interpreter patches the ``triton.language`` modules the helper
    sees, with a scan of the whole module (about 1.5 ms), even when the launch (or an earlier call) patched them
    already and nothing is left to patch: the driver's helpers are called some 15 times per program. This
    patches only where a module is not patched yet (its ``full`` is still the compiled-mode builtin), which is
    what the scan would find; what the kernels compute is unchanged (the same bits, checked when this was
    written). A no-op where the interpreter's internals are not the expected ones."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    cls = getattr(interpreter, "InterpretedFunction", None)
    patch = getattr(interpreter, "_patch_lang", None)
    if cls is None or patch is None or getattr(cls, "_torch_adamp_fast", False) or not hasattr(cls, "rewrite"):
        return
    langs: dict[int, list[Any]] = {}

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen = langs.get(id(self.fn))
        if seen is None:
            seen = langs[id(self.fn)] = [v for v in self.fn.__globals__.values() if v is tl or v is tl.core]
        if any(tl.core.is_builtin(lang.full) for lang in seen):
            patch(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    cls.__call__ = call
    cls._torch_adamp_fast = True


#: operators that bring a tensor's value to the host (item(), bool(), float(), int() all go through the first)
HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.allclose.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}
