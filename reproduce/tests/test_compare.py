"""Fashion-MNIST loading (on the shipped subset) and the compare experiment at a tiny size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_adamp import Projected
from torch_adamp_reproduce import cli, compare, fashion_mnist

TINY = dict(epochs=1, seeds=2, image_size=8, train_size=300, test_size=100, batch_size=16, width=8, evals_per_epoch=1)


@pytest.fixture
def shipped_only(monkeypatch, tmp_path):
    """Make the shipped subset the only source, as on a fresh machine."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- data ----------------------------------------------------------------------------------
def test_shipped_subset() -> None:
    raw = fashion_mnist.read_subset()
    assert raw.train.images.shape == (20000, 14, 14) and raw.train.images.dtype == np.uint8
    assert raw.test.images.shape == (5000, 14, 14) and raw.test.images.dtype == np.uint8
    assert np.bincount(raw.train.labels).tolist() == [2000] * 10
    assert np.bincount(raw.test.labels).tolist() == [500] * 10
    assert raw.train.images.max() > 200  # real images, not blank


def test_load_from_the_shipped_subset(shipped_only) -> None:
    d = fashion_mnist.load(train_size=50, test_size=20, image_size=7)
    assert "shipped" in d.source
    assert d.train_x.shape == (50, 1, 7, 7) and d.train_x.dtype == torch.float32
    assert d.test_x.shape == (20, 1, 7, 7)
    assert torch.bincount(d.train_y).tolist() == [5] * 10
    assert torch.bincount(d.test_y).tolist() == [2] * 10
    assert d.train_x.isfinite().all()
    full = fashion_mnist.load(train_size=20000, test_size=5000, image_size=14)
    assert abs(float(full.train_x.mean())) < 0.05 and 0.8 < float(full.train_x.std()) < 1.1


def test_subset_limits(shipped_only) -> None:
    with pytest.raises(fashion_mnist.DataError, match="full 28x28"):
        fashion_mnist.load(train_size=100, test_size=100, image_size=20)
    with pytest.raises(fashion_mnist.DataError, match="between 1 and 20000"):
        fashion_mnist.load(train_size=20001, test_size=100, image_size=14)
    with pytest.raises(fashion_mnist.DataError, match="between 4 and 28"):
        fashion_mnist.load(train_size=100, test_size=100, image_size=2)


def test_missing_data_dir(tmp_path, monkeypatch) -> None:
    with pytest.raises(fashion_mnist.DataError, match="does not exist"):
        fashion_mnist.locate(tmp_path / "nope")
    with pytest.raises(fashion_mnist.DataError, match="lacks the Fashion-MNIST files"):
        fashion_mnist.locate(tmp_path)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(fashion_mnist.DataError, match=fashion_mnist.ENV_VAR):
        fashion_mnist.locate()


def test_full_set_reader_and_the_subset_agree(tmp_path) -> None:
    """A full-set folder (idx files) yields the same images as the subset, for sizes <= 14."""
    raw = fashion_mnist.read_subset()
    # rebuild 28x28 images whose 2x2 means are the subset's pixels, write them as idx files
    big = raw.train.images.repeat(2, axis=1).repeat(2, axis=2)
    small = raw.test.images.repeat(2, axis=1).repeat(2, axis=2)

    def write(name: str, arr: np.ndarray, magic: int) -> None:
        header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
        (tmp_path / name).write_bytes(header + arr.astype(np.uint8).tobytes())

    write("train-images-idx3-ubyte", big, 2051)
    write("train-labels-idx1-ubyte", raw.train.labels, 2049)
    write("t10k-images-idx3-ubyte", small, 2051)
    write("t10k-labels-idx1-ubyte", raw.test.labels, 2049)
    full = fashion_mnist.load(train_size=200, test_size=50, image_size=14, data_dir=tmp_path)
    ref = fashion_mnist.read_subset()
    idx = fashion_mnist.first_per_class(ref.train.labels, 200)
    assert torch.equal(full.train_x, fashion_mnist.to_tensor(ref.train.images[idx], 14))
    assert fashion_mnist.load(train_size=10, test_size=10, image_size=28, data_dir=tmp_path).train_x.shape[-1] == 28


def test_halve_rounds_half_up() -> None:
    img = np.array([[[0, 1], [1, 0]], [[1, 1], [1, 0]], [[255, 255], [255, 255]]], dtype=np.uint8)
    assert fashion_mnist.halve(img).ravel().tolist() == [1, 1, 255]  # 0.5 -> 1, 0.75 -> 1


# -- the experiment -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_results():
    mp = pytest.MonkeyPatch()
    mp.delenv(fashion_mnist.ENV_VAR, raising=False)
    mp.setattr(fashion_mnist, "DEBIAN_DIR", fashion_mnist.Path("/nonexistent/torch-adamp-test"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield compare.run(compare.Config(**TINY), quiet=True, log=lambda s: None)
    finally:
        torch.set_num_threads(before)
        mp.undo()


@pytest.mark.parametrize(("baseline", "projected"), compare.PAIRS)
def test_projection_keeps_scale_invariant_norms_smaller_on_every_seed(tiny_results, baseline, projected) -> None:
    runs = {(r["optimizer"], r["seed"]): r for r in tiny_results["runs"]}
    for seed in (0, 1):
        b, p = runs[baseline, seed], runs[projected, seed]
        assert p["final_weight_norm"] < b["final_weight_norm"], (baseline, projected, seed)
        assert p["mean_effective_step"] > b["mean_effective_step"]
        assert p["projected_fraction"] == 1.0  # every conv weight detected as scale-invariant
        assert b["projected_fraction"] is None


def test_results_layout(tiny_results) -> None:
    s = tiny_results["summary"]
    assert list(s) == list(compare.OPTIMIZERS)
    assert s["sgd"]["implementation"] == "torch.optim.SGD" and s["adamp"]["implementation"] == "torch_adamp.AdamP"
    for row in s.values():
        assert row["seeds"] == [0, 1]
        assert 0.0 <= row["test_accuracy_mean"] <= 100.0
    run = tiny_results["runs"][0]
    assert len(run["curves"]["accuracy"]) == len(run["curves"]["eval_epoch"]) == 2
    assert len(run["curves"]["weight_norm"]) == len(run["curves"]["log_epoch"]) > 0
    table = compare.format_table(s)
    assert all(row["label"] in table for row in s.values())


def test_deterministic_with_a_seed(shipped_only, one_thread, tiny_results) -> None:
    cfg = compare.Config(**{**TINY, "seeds": 1, "optimizers": ("sgdp",)})
    a = compare.train_one("sgdp", 0, fashion_mnist.load(train_size=300, test_size=100, image_size=8), cfg)
    b = compare.train_one("sgdp", 0, fashion_mnist.load(train_size=300, test_size=100, image_size=8), cfg)
    assert a.curves == b.curves
    same = next(r for r in tiny_results["runs"] if r["optimizer"] == "sgdp" and r["seed"] == 0)
    assert same["curves"] == a.curves


def test_model_conv_weights_are_scale_invariant() -> None:
    torch.manual_seed(0)
    model = compare.make_model(4).train()
    x = torch.randn(16, 1, 8, 8)
    names = compare.scale_invariant_names(model)
    assert len(names) == 3
    params = dict(model.named_parameters())
    out = model(x)
    with torch.no_grad():
        for n in names:
            params[n].mul_(3.0)
    assert torch.allclose(model(x), out, atol=1e-4)


# --optimizers NAME+p: torch_adamp.Projected around any of the baselines
def test_compare_accepts_wrapped_optimizers() -> None:
    assert compare.OPTIMIZERS == ("sgd", "sgdp", "adamw", "adamp")  # the default set is unchanged
    assert cli._optimizer_list("adafactor, adafactor+p,radam+P") == ["adafactor", "adafactor+p", "radam+p"]
    assert cli._optimizer_list("lion,lion+p,adamw8bit+p") == ["lion", "lion+p", "adamw8bit+p"]
    with pytest.raises(Exception, match="unknown"):
        cli._optimizer_list("lamb+p")
    model, cfg = compare.make_model(4), compare.Config()
    for name, cls in (("adafactor", torch.optim.Adafactor), ("radam", torch.optim.RAdam), ("nadam", torch.optim.NAdam)):
        plain, wrapped = compare.make_optimizer(name, model, cfg), compare.make_optimizer(f"{name}+p", model, cfg)
        assert type(plain) is cls and isinstance(wrapped, Projected) and type(wrapped.inner) is cls
        assert compare.LABELS[f"{name}+p"].endswith("+P")
    for name, module, cls_name in (("lion", "lion_pytorch", "Lion"), ("adamw8bit", "torchao.optim", "AdamW8bit")):
        cls = getattr(pytest.importorskip(module), cls_name)
        plain, wrapped = compare.make_optimizer(name, model, cfg), compare.make_optimizer(f"{name}+p", model, cfg)
        assert type(plain) is cls and isinstance(wrapped, Projected) and type(wrapped.inner) is cls
        assert compare.BASELINE_CLASSES[f"{name}+p"] == f"torch_adamp.Projected({module}.{cls_name})"
