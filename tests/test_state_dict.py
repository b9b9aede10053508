"""State dicts: our round trip, and migration from and to the reference package ``adamp==0.3.0``.

* Saving (through ``torch.save`` / ``torch.load``) and loading into a fresh
  optimizer, then continuing, is bitwise identical to never stopping, on every path.
* A state dict saved by ``adamp.AdamP`` / ``adamp.SGDP`` (integer ``step``)
  loads into ours and continues bitwise identically (per-tensor path) or within
  1e-6 (other paths).
* Back: :func:`torch_adamp.to_reference_state_dict` converts ours (tensor
  ``step``, extra options) into the reference's format, which then continues
  bitwise identically; options the reference cannot reproduce are refused.
"""

from __future__ import annotations

import copy
import io
from typing import Any

import helpers
import pytest
import torch
from helpers import OPTION_SETS, PATHS, make_model, make_ours, make_reference, path_kwargs
from torch import Tensor

import torch_adamp

ARCH = "conv_bn"
CASES = ["adamp-groups", "adamp-nesterov-wd", "sgdp-groups", "sgdp-momentum-dampening"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from helpers.one_thread()


def _through_disk(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _train(opt, model, loss_at, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        loss_at(step).backward()
        opt.step()


def _assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k, v in sa["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb["state"][i][k])), (i, k)
    # torch's __setstate__ adds "differentiable" to the defaults, which the loaded groups then inherit
    ignore = ("params", "differentiable")
    strip = [{k: v for k, v in g.items() if k not in ignore} for g in sa["param_groups"]]
    assert strip == [{k: v for k, v in g.items() if k not in ignore} for g in sb["param_groups"]]


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


# -- our own round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES)
def test_round_trip_continues_bitwise(case: str, path: str) -> None:
    """10 steps, save, load into a fresh optimizer and model, 10 more == 20 uninterrupted steps."""
    o = OPTION_SETS[case]
    opts = {**o.options, **path_kwargs(path), "track_stats": True}
    model, loss_at = make_model(ARCH)
    straight = helpers.clone_model(model)
    straight_loss = helpers.loss_fn(straight, ARCH)
    opt = make_ours(o.kind, model, opts, o.groups)
    straight_opt = make_ours(o.kind, straight, opts, o.groups)
    _train(opt, model, loss_at, range(10))
    _train(straight_opt, straight, straight_loss, range(20))

    saved_model, saved_opt = _through_disk(model.state_dict()), _through_disk(opt.state_dict())
    resumed, _ = make_model(ARCH)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)  # overwritten by the load
    resumed.load_state_dict(saved_model)
    resumed_loss = helpers.loss_fn(resumed, ARCH)
    resumed_opt = make_ours(o.kind, resumed, opts, o.groups)
    resumed_opt.load_state_dict(saved_opt)
    if o.kind == "adamp":
        step = resumed_opt.state[next(resumed.parameters())]["step"]
        assert isinstance(step, Tensor) and step.item() == 10
    _train(resumed_opt, resumed, resumed_loss, range(10, 20))

    _assert_same_params(resumed, straight)
    _assert_same_state(resumed_opt, straight_opt)


@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_loaded_groups_keep_our_options(kind: str) -> None:
    """Options the reference lacks (scale_invariant, project_momentum, maximize) survive a round trip."""
    model, _ = make_model("mlp")
    extra = {"scale_invariant": "layer", "maximize": True}
    if kind == "sgdp":
        extra["project_momentum"] = False
    opt = make_ours(kind, model, {**helpers.BASE_OPTIONS[kind], **extra})
    fresh = make_ours(kind, helpers.clone_model(model), helpers.BASE_OPTIONS[kind])
    fresh.load_state_dict(_through_disk(opt.state_dict()))
    for key, value in extra.items():
        assert fresh.param_groups[0][key] == value


# -- from the reference -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", CASES)
def test_reference_state_dict_loads_and_continues(case: str, path: str) -> None:
    """The reference trains 10 steps; its state dict (int ``step``) loads into ours; both continue
    10 steps: bitwise equal on the per-tensor path, within 1e-6 (float32) on the others."""
    o = OPTION_SETS[case]
    ref_model, ref_loss = make_model(ARCH)
    ref = make_reference(o.kind, ref_model, o.options, o.groups)
    _train(ref, ref_model, ref_loss, range(10))
    saved = _through_disk(ref.state_dict())
    if o.kind == "adamp":
        assert type(next(iter(saved["state"].values()))["step"]) is int

    model = helpers.clone_model(ref_model)
    loss_at = helpers.loss_fn(model, ARCH)
    ours = make_ours(o.kind, model, {**o.options, **path_kwargs(path)}, o.groups)
    ours.load_state_dict(saved)
    assert ours.param_groups[0]["scale_invariant"] == "auto"  # our defaults fill the reference's groups
    if o.kind == "adamp":
        step = ours.state[next(model.parameters())]["step"]
        assert isinstance(step, Tensor) and step.item() == 10
    _train(ref, ref_model, ref_loss, range(10, 20))
    _train(ours, model, loss_at, range(10, 20))
    if path == "single":
        _assert_same_params(model, ref_model)
    else:
        assert helpers.max_rel_diff(model.parameters(), ref_model.parameters()) <= 1e-6


# -- to the reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_to_reference_state_dict_continues_bitwise(case: str) -> None:
    """Ours (per-tensor path, track_stats, a scheduler) trains 10 steps; converted, the state dict
    loads into the reference; both continue 10 steps with the scheduler: bitwise equal."""
    o = OPTION_SETS[case]
    model, loss_at = make_model(ARCH)
    ours = make_ours(o.kind, model, {**o.options, "foreach": False, "track_stats": True}, o.groups)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(ours, gamma=0.95)
    for step in range(10):
        _train(ours, model, loss_at, [step])
        scheduler.step()
    original = ours.state_dict()
    before = copy.deepcopy(original)
    converted = torch_adamp.to_reference_state_dict(original)

    # the input is untouched; the output has int steps, float lr, only keys the reference knows (+ torch's)
    _assert_equal_nested(original, before)
    for st in converted["state"].values():
        assert "step" not in st or type(st["step"]) is int
    for group in converted["param_groups"]:
        assert not {"foreach", "fused", "scale_invariant", "maximize", "track_stats"} & group.keys()
        assert "initial_lr" in group and type(group["lr"]) is float

    ref_model = helpers.clone_model(model)
    ref_loss = helpers.loss_fn(ref_model, ARCH)
    ref = make_reference(o.kind, ref_model, o.options, o.groups)
    ref.load_state_dict(_through_disk(converted))
    ref_scheduler = torch.optim.lr_scheduler.ExponentialLR(ref, gamma=0.95, last_epoch=9)
    for step in range(10, 20):
        _train(ours, model, loss_at, [step])
        _train(ref, ref_model, ref_loss, [step])
        scheduler.step()
        ref_scheduler.step()
    _assert_same_params(model, ref_model)
    assert [g["lr"] for g in ref.param_groups] == [g["lr"] for g in ours.param_groups]


@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_reference_format_round_trip(kind: str) -> None:
    """Ours -> reference format -> ours again continues bitwise (tensor lr and capturable-free steps)."""
    model, loss_at = make_model("linear_ln")
    opts = {**helpers.BASE_OPTIONS[kind], "lr": torch.tensor(helpers.BASE_OPTIONS[kind]["lr"]), "foreach": False}
    ours = make_ours(kind, model, opts)
    straight = helpers.clone_model(model)
    straight_loss = helpers.loss_fn(straight, "linear_ln")
    straight_opt = make_ours(kind, straight, opts)
    _train(ours, model, loss_at, range(5))
    _train(straight_opt, straight, straight_loss, range(10))
    converted = _through_disk(torch_adamp.to_reference_state_dict(ours.state_dict()))
    assert type(converted["param_groups"][0]["lr"]) is float
    again = make_ours(kind, model, opts)
    again.load_state_dict(converted)
    # a float lr equal to the float32 tensor's value: the same numbers as the tensor lr
    assert again.param_groups[0]["lr"] == float(opts["lr"])
    _train(again, model, loss_at, range(5, 10))
    assert helpers.max_rel_diff(model.parameters(), straight.parameters()) <= 1e-6


@pytest.mark.parametrize(
    ("kind", "option", "value"),
    [
        ("adamp", "maximize", True),
        ("adamp", "scale_invariant", "channel"),
        ("adamp", "scale_invariant", False),
        ("sgdp", "project_momentum", False),
        ("sgdp", "scale_invariant", "layer"),
    ],
)
def test_to_reference_state_dict_refuses_what_the_reference_cannot_do(kind: str, option: str, value: Any) -> None:
    model, loss_at = make_model("mlp")
    ours = make_ours(kind, model, {**helpers.BASE_OPTIONS[kind], option: value})
    _train(ours, model, loss_at, range(2))
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        torch_adamp.to_reference_state_dict(ours.state_dict())


def _assert_equal_nested(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_equal_nested(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_equal_nested(x, y)
    elif isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b and type(a) is type(b)


@pytest.mark.parametrize("kind", list(helpers.SMALL_MAKERS))
def test_state_dict_is_deterministic_through_load_and_deepcopy(kind: str) -> None:
    """Hardening round 2, item 1 (found by another project's optimizer suite): load_state_dict() and deepcopy()
    keep the param groups as they were."""
    params = helpers.small_params()
    opt = helpers.SMALL_MAKERS[kind](params)
    helpers.random_grads(params, 1)
    opt.step()
    saved = opt.state_dict()
    other = helpers.SMALL_MAKERS[kind](helpers.small_params())
    other.load_state_dict(copy.deepcopy(saved))
    again = other.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    assert "differentiable" not in again["param_groups"][0]
    assert copy.deepcopy(opt).state_dict()["param_groups"] == saved["param_groups"]


@pytest.mark.parametrize(("key", "value"), [("nesterov", "no"), ("lr", "abc"), ("eps", -1.0)])
def test_bad_group_values_are_refused_on_load_before_anything_changes(key: str, value: Any) -> None:
    """Hardening round 2, item 11 (found by another project's optimizer suite): group values checked on load as at
    construction."""
    params = helpers.small_params()
    opt = helpers.SMALL_MAKERS["adamp"](params)
    helpers.random_grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(saved)
    bad["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for name, t in st.items():
            assert torch.equal(after["state"][k][name], t)


@pytest.mark.parametrize("path", PATHS)
def test_integer_step_counters_are_normalised(path: str) -> None:
    """Hardening round 2 (found by another project's optimizer suite). A checkpoint with an int64 (or Python int)
    step, which torch.optim.AdamW and foreach=False accept."""
    params = helpers.small_params()
    opt = torch_adamp.AdamP(params, lr=1e-2, **path_kwargs(path))
    helpers.random_grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    ref = torch_adamp.AdamP([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, **path_kwargs(path))
    ref.load_state_dict(copy.deepcopy(sd))
    sd["state"][0]["step"] = torch.tensor(1, dtype=torch.int64)
    sd["state"][1]["step"] = 1
    opt.load_state_dict(sd)
    for o in (opt, ref):
        helpers.random_grads(list(o.param_groups[0]["params"]), 1)
        o.step()
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
    assert all(isinstance(opt.state[p]["step"], Tensor) and opt.state[p]["step"].dtype == torch.float32 for p in params)


def _stepped(cls: type, **kw: Any) -> torch.optim.Optimizer:
    params = helpers.small_params()
    opt = cls(params, **kw)
    helpers.random_grads(params, 0)
    opt.step()
    return opt


@pytest.mark.parametrize(
    ("source", "target", "error", "match"),
    [
        ("sgdp", "adamp", ValueError, "'momentum', an option of the rule 'sgdp', not of AdamP"),
        ("adamp", "sgdp", ValueError, "'betas', an option of the rule 'adamp' or 'lionp', not of SGDP"),
        ("torch_sgd", "sgdp", KeyError, "has no 'momentum'.*momentum_buffer"),
        ("adamp_without_exp_avg", "adamp", KeyError, "parameter #0 \\(shape \\(6, 4, 3, 3\\)\\).* has no 'exp_avg'"),
        ("adamp_without_step", "adamp", KeyError, "has no 'step'"),
        ("sgdp_before_any_step", "adamp", ValueError, "an option of the rule 'sgdp'"),
    ],
)
def test_a_checkpoint_that_does_not_belong_is_refused_with_nothing_changed(
    source: str, target: str, error: type[Exception], match: str
) -> None:
    """Hardening round 3, item 2: a checkpoint of another optimizer, or one missing a state tensor, used to
    load silently and restart the state (the step counter back to 1, the moments to zero; with SGDP's into
    AdamP the lr became SGDP's). Refused at load_state_dict, naming the parameter and the key (KeyError, as
    torch's optimizers raise at their next step) or the foreign option, with nothing changed."""
    makers: dict[str, Any] = {
        "adamp": lambda: _stepped(torch_adamp.AdamP, lr=1e-3),
        "sgdp": lambda: _stepped(torch_adamp.SGDP, lr=0.1, momentum=0.9),
        "torch_sgd": lambda: _stepped(torch.optim.SGD, lr=0.1, momentum=0.9),
        "sgdp_before_any_step": lambda: torch_adamp.SGDP(helpers.small_params(), lr=0.5),
    }
    if source.startswith("adamp_without"):
        sd = copy.deepcopy(makers["adamp"]().state_dict())
        del sd["state"][0][source.removeprefix("adamp_without_")]
    else:
        sd = copy.deepcopy(makers[source]().state_dict())
    opt = makers[target]()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        assert all(torch.equal(after["state"][k][n], t) for n, t in st.items())


def test_reference_checkpoints_still_load() -> None:
    """adamp 0.3.0's state dicts (int steps, its group keys) keep loading, and torch.optim.Adam's too."""
    reference = pytest.importorskip("adamp")
    for ref_cls, ours, kw in (
        (reference.AdamP, torch_adamp.AdamP, {}),
        (reference.SGDP, torch_adamp.SGDP, {"lr": 0.1}),
    ):
        ref = _stepped(ref_cls, **({"lr": 0.1, "momentum": 0.9} if ref_cls is reference.SGDP else {}))
        ours(helpers.small_params(), **kw).load_state_dict(ref.state_dict())
    torch_adamp.AdamP(helpers.small_params()).load_state_dict(_stepped(torch.optim.Adam).state_dict())
