"""find_scale_invariant and param_groups: right answers on known architectures, model left untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_adamp
from torch_adamp import SGDP, AdamP, find_scale_invariant, param_groups


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution: each output filter is normalised before use."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ResidualBlock(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(c, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.drop(self.bn2(self.conv2(y)))
        return self.head(F.relu(x + y).mean(dim=(2, 3)))


class TwoInputs(nn.Module):
    """Two inputs, a dict output; ``a`` feeds a LayerNorm, ``b`` is added after it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6, bias=False)
        self.b = nn.Linear(4, 6, bias=False)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        h = self.ln(self.a(x)) + self.b(y)
        return {"logits": self.out(h), "hidden": h}


def _conv_bn(bias: bool) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


CASES = {
    # name: (model factory, input shapes, expected view of each weight with >= 2 dims)
    "conv_bn": (lambda: _conv_bn(False), [(4, 3, 8, 8)], {"0.weight": "channel", "3.weight": "none"}),
    "conv_bias_bn": (lambda: _conv_bn(True), [(4, 3, 8, 8)], {"0.weight": "channel", "3.weight": "none"}),
    "linear_ln": (
        lambda: nn.Sequential(nn.Linear(10, 16, bias=False), nn.LayerNorm(16)),
        [(5, 10)],
        {"0.weight": "layer"},
    ),
    "linear_bias_ln": (lambda: nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16)), [(5, 10)], {"0.weight": "none"}),
    "mlp": (
        lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)),
        [(5, 10)],
        {"0.weight": "none", "2.weight": "none"},
    ),
    "ws_conv": (
        lambda: nn.Sequential(WSConv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1)),
        [(2, 3, 8, 8)],
        {"0.weight": "channel", "2.weight": "none"},
    ),
    "residual": (
        ResidualBlock,
        [(4, 8, 6, 6)],
        {"conv1.weight": "channel", "conv2.weight": "channel", "head.weight": "none"},
    ),
    "two_inputs": (TwoInputs, [(5, 5), (5, 4)], {"a.weight": "layer", "b.weight": "none", "out.weight": "none"}),
}


def _make(case: str) -> tuple[nn.Module, tuple[Tensor, ...], dict[str, str]]:
    factory, shapes, expected = CASES[case]
    torch.manual_seed(0)
    model = factory()
    return model, tuple(torch.randn(s) for s in shapes), expected


def _snapshot(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "ids": [id(t) for t in model.state_dict(keep_vars=True).values()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["ids"] == b["ids"] and a["training"] == b["training"] and a["requires_grad"] == b["requires_grad"]
    for k, t in a["tensors"].items():  # bitwise, dtype and all
        u = b["tensors"][k]
        assert t.dtype == u.dtype and torch.equal(t.view(-1).view(torch.uint8), u.view(-1).view(torch.uint8)), k
    for k, g in a["grads"].items():
        h = b["grads"][k]
        assert (g is None and h is None) or torch.equal(g, h), k


@pytest.mark.parametrize("case", sorted(CASES))
def test_find_scale_invariant_known_architectures(case: str) -> None:
    model, inputs, expected = _make(case)
    got = find_scale_invariant(model, *inputs)
    assert list(got) == [n for n, _ in model.named_parameters()]
    assert {n: v for n, v in got.items() if n in expected} == expected
    assert all(v == "none" for n, p in model.named_parameters() if p.dim() < 2 for v in [got[n]])


@pytest.mark.parametrize("case", ["residual", "conv_bias_bn", "two_inputs"])
def test_model_rng_and_modes_are_left_exactly_as_they_were(case: str) -> None:
    model, inputs, _ = _make(case)
    model.train()
    for i, m in enumerate(model.modules()):  # mixed train/eval flags
        m.training = i % 2 == 0
    model(*inputs)  # non-trivial running statistics
    out = model(*inputs)
    loss = (out["logits"] if isinstance(out, dict) else out).square().sum()
    loss.backward()
    before = _snapshot(model)
    rng = torch.get_rng_state()
    find_scale_invariant(model, *inputs)
    _assert_same(before, _snapshot(model))
    assert torch.equal(torch.get_rng_state(), rng)


def test_batchnorm_is_scale_invariant_only_with_batch_statistics() -> None:
    model, inputs, _ = _make("conv_bn")
    model(*inputs)  # running statistics move away from their initial values
    model.eval()
    assert find_scale_invariant(model, *inputs)["0.weight"] == "channel"  # checked in training mode
    assert find_scale_invariant(model, *inputs, train=False)["0.weight"] == "none"  # running statistics
    assert not model.training


def test_dropout_does_not_blur_the_comparison() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), nn.LayerNorm(16), nn.Dropout(0.5), nn.Linear(16, 2))
    assert find_scale_invariant(model, torch.randn(6, 8))["0.weight"] == "layer"


def test_loss_fn_compares_the_loss() -> None:
    """A weight whose output scales but whose loss does not (cosine loss): invariant only through the loss."""
    torch.manual_seed(0)
    model = nn.Linear(10, 4, bias=False)
    x, target = torch.randn(6, 10), torch.randn(6, 4)
    assert find_scale_invariant(model, x)["weight"] == "none"

    def loss_fn(out: Tensor) -> Tensor:  # cosine of each row with its target
        return F.cosine_similarity(out, target, dim=1)

    assert find_scale_invariant(model, x, loss_fn=loss_fn)["weight"] == "layer"


def test_unused_and_zero_weights_are_none() -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4, bias=False)
            self.zero = nn.Linear(4, 4, bias=False)
            self.unused = nn.Linear(4, 4, bias=False)
            nn.init.zeros_(self.zero.weight)

        def forward(self, x: Tensor) -> Tensor:
            return F.layer_norm(self.used(x) + self.zero(x), (4,))

    torch.manual_seed(0)
    got = find_scale_invariant(Model(), torch.randn(5, 4))
    assert got == {"used.weight": "layer", "zero.weight": "none", "unused.weight": "none"}


def test_tied_weights() -> None:
    """An embedding tied to the output layer: scaling it scales the logits (not invariant)."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.proj = nn.Linear(8, 8, bias=False)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx: Tensor) -> Tensor:
            return self.out(F.layer_norm(self.proj(self.emb(idx)), (8,)))

    torch.manual_seed(0)
    assert find_scale_invariant(Tied(), torch.randint(0, 10, (4, 5))) == {"emb.weight": "none", "proj.weight": "layer"}


def test_transposed_conv_is_layer_invariant_in_the_optimizer_views() -> None:
    """ConvTranspose2d weights are (in, out, kh, kw): rows are input channels, so BatchNorm after it
    (per *output* channel) makes the weight invariant in the layer view only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, bias=False), nn.BatchNorm2d(6))
    assert find_scale_invariant(model, torch.randn(3, 4, 5, 5))["0.weight"] == "layer"


def test_param_groups_without_inputs() -> None:
    torch.manual_seed(0)
    model = _conv_bn(True)
    model[3].weight.requires_grad_(False)  # frozen: left out
    groups = param_groups(model, 0.05)
    assert [g["param_names"] for g in groups] == [["0.weight"], ["0.bias", "1.weight", "1.bias", "3.bias"]]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all("scale_invariant" not in g for g in groups)
    opt = AdamP(groups, lr=0.1)
    assert opt.param_groups[0]["scale_invariant"] == "auto"


def test_param_groups_with_inputs_feed_the_optimizers() -> None:
    model, inputs, _ = _make("two_inputs")
    groups = param_groups(model, 0.01, example_inputs=inputs)
    by_view = {g.get("scale_invariant", "1-D"): g["param_names"] for g in groups}
    assert by_view == {
        "layer": ["a.weight"],
        False: ["b.weight", "out.weight"],
        "1-D": ["ln.weight", "ln.bias", "out.bias"],
    }
    assert [g["weight_decay"] for g in groups] == [0.01, 0.01, 0.0]
    for cls in (AdamP, SGDP):
        opt = cls(param_groups(model, 0.01, example_inputs=inputs), lr=0.01, track_stats=True)
        model.zero_grad()
        model(*inputs)["logits"].square().sum().backward()
        opt.step()
        stats = opt.stats()
        assert stats["a.weight/view"] == 2.0 and stats["b.weight/view"] == 0.0 and stats["out.bias/view"] == 0.0


def test_param_groups_single_tensor_input() -> None:
    model, (x,), _ = _make("conv_bn")
    groups = param_groups(model, 0.1, example_inputs=x)
    assert [(g.get("scale_invariant"), g["param_names"]) for g in groups] == [
        ("channel", ["0.weight"]),
        (False, ["3.weight"]),
        (None, ["1.weight", "1.bias", "3.bias"]),
    ]


def test_exported() -> None:
    assert torch_adamp.find_scale_invariant is find_scale_invariant and torch_adamp.param_groups is param_groups


def test_lazy_modules_must_be_initialised_first() -> None:
    model = nn.Sequential(nn.LazyLinear(4, bias=False), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="lazy"):
        find_scale_invariant(model, torch.randn(3, 5))
    model(torch.randn(3, 5))
    assert find_scale_invariant(model, torch.randn(3, 5))["0.weight"] == "layer"
