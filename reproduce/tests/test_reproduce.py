"""``torch-adamp reproduce``: metrics on hand-made cases, deterministic data, every task on a tiny budget."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import torch_adamp
from torch_adamp_reproduce import cli, compare, fashion_mnist, tasks
from torch_adamp_reproduce.tasks import (
    adversarial,
    audio,
    audio_data,
    bias,
    classification,
    common,
    language,
    retrieval,
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """The shipped subset as data source, one thread, torch's thread count restored afterwards."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- metrics on hand-made cases ---------------------------------------------------------------
def _at_angles(degrees):
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_recall_at_k_on_a_known_embedding():
    # angles 0, 12, 90, 20 with labels 0, 0, 1, 1: the neighbours, nearest first, are
    # 0 -> 12, 20, 90 (hit at 1); 12 -> 20, 0 (miss, hit at 2); 90 -> 20 (hit); 20 -> 12, 0, 90 (hit at 3)
    emb = _at_angles([0, 12, 90, 20])
    labels = torch.tensor([0, 0, 1, 1])
    assert retrieval.recall_at_k(emb, labels, ks=(1, 2, 3)) == {1: 50.0, 2: 75.0, 3: 100.0}
    scaled = emb * torch.tensor([[3.0], [0.1], [7.0], [1.0]])  # cosine similarity: scale does not matter
    assert retrieval.recall_at_k(scaled, labels, ks=(1, 2, 3)) == {1: 50.0, 2: 75.0, 3: 100.0}
    with pytest.raises(ValueError, match="k must be between 1 and 3"):
        retrieval.recall_at_k(emb, labels, ks=(4,))


def test_proxy_anchor_matches_its_definition_and_rewards_alignment():
    torch.manual_seed(0)
    emb, proxies = torch.randn(12, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 0, 1])  # proxy 3 has no positive
    a, m = 32.0, 0.1
    cos = F.normalize(emb) @ F.normalize(proxies).T
    pos = F.one_hot(labels, 4).double()
    p_term = sum(
        math.log(1 + float((pos[:, p] * torch.exp(-a * (cos[:, p] - m))).sum())) for p in range(4) if pos[:, p].any()
    )
    n_term = sum(math.log(1 + float(((1 - pos[:, p]) * torch.exp(a * (cos[:, p] + m))).sum())) for p in range(4))
    expected = p_term / 3 + n_term / 4
    got = float(retrieval.proxy_anchor_loss(emb, labels, proxies, a, m))
    assert got == pytest.approx(expected, rel=1e-9)
    aligned = proxies[labels] + 0.01 * torch.randn(12, 5, dtype=torch.float64)
    anti = -aligned
    assert float(retrieval.proxy_anchor_loss(aligned, labels, proxies)) < got
    assert float(retrieval.proxy_anchor_loss(anti, labels, proxies)) > got


def _trained_classifier():
    torch.manual_seed(0)
    data = fashion_mnist.load(train_size=500, test_size=100, image_size=8)
    model = adversarial.Normalised(compare.make_model(4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = adversarial.pixels(data.train_x)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), data.train_y).backward()
        opt.step()
    return model.eval(), adversarial.pixels(data.test_x), data.test_y


def test_pgd_increases_the_loss_and_stays_in_the_ball():
    model, x, y = _trained_classifier()
    eps = 0.1
    grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    adv = adversarial.pgd_linf(model, x, y, eps, steps=10, gen=torch.Generator().manual_seed(0))
    for before, p in zip(grads_before, model.parameters(), strict=True):  # parameter gradients untouched
        assert (before is None and p.grad is None) or torch.equal(before, p.grad)
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
        random = F.cross_entropy(model((x + eps * (torch.rand_like(x) * 2 - 1)).clamp(0, 1)), y)
        attacked = F.cross_entropy(model(adv), y)
        one_step = F.cross_entropy(model(adversarial.pgd_linf(model, x, y, eps, steps=1)), y)
    assert attacked > 1.5 * clean and attacked > 1.5 * random
    assert attacked > one_step  # more steps, a stronger attack
    acc = lambda z: float((model(z).argmax(1) == y).float().mean())
    with torch.no_grad():
        assert acc(adv) < acc(x)
    with pytest.raises(ValueError, match="eps and steps"):
        adversarial.pgd_linf(model, x, y, -0.1, 3)


def test_biased_set_has_the_stated_correlation_and_is_deterministic():
    cfg = bias.Config(rho=0.9, train_size=10000, test_size=5000)
    a, b = bias.make_sets(cfg), bias.make_sets(cfg)
    for f in ("train_x", "train_colour", "test_x", "test_colour", "test_biased_x"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    match = float((a.train_colour == a.train_y).double().mean())
    assert abs(match - 0.9) < 4 * math.sqrt(0.9 * 0.1 / 10000)
    # the other colours: uniform over the nine others
    counts = torch.bincount((a.train_colour - a.train_y)[a.train_colour != a.train_y] % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.7 * counts[1:].float().mean()
    # the unbiased test set: colour independent of the label
    assert abs(float((a.test_colour == a.test_y).double().mean()) - 0.1) < 4 * math.sqrt(0.09 / 5000)
    table = torch.zeros(10, 10)
    table.index_put_((a.test_y, a.test_colour), torch.ones(len(a.test_y)), accumulate=True)
    assert table.min() > 0.5 * table.mean()
    # the background (intensity 0) is exactly the colour, the foreground tends to white
    img = np.array([[[0, 255]]], dtype=np.uint8)
    out = bias.colourise(img, np.array([6]))
    assert np.allclose(out[0, :, 0, 0], bias.COLOURS[6]) and np.allclose(out[0, :, 0, 1], 1.0)
    with pytest.raises(ValueError, match="rho"):
        bias.colour_indices(np.zeros(3, dtype=np.int64), 1.5, np.random.default_rng(0))


def test_paired_gain_verdicts():
    g = common.paired_gain([70.0, 71.0, 72.0], [71.0, 72.1, 72.9], higher_is_better=True)
    assert g["mean"] == pytest.approx(1.0) and g["verdict"] == "gain"
    assert common.paired_gain([1.0, 2.0, 3.0], [1.5, 1.5, 3.0], True)["verdict"] == "within noise"
    ppl = common.paired_gain([9.0, 9.1, 9.2], [9.5, 9.6, 9.7], higher_is_better=False)
    assert ppl["mean"] == pytest.approx(-0.5) and ppl["verdict"] == "loss"
    assert common.paired_gain([1.0], [2.0], True)["verdict"] == "one seed"
    assert common.t95(2) == 4.30 and common.t95(11) == 2.13 and common.t95(100) == 1.96


# -- weight norm: which tensor is scale-invariant, and what AdamP does with it ------------------
def test_weight_norm_v_is_channel_invariant_g_is_not_and_adamp_projects_v():
    cfg = language.Config(dim=16, heads=2, layers=1, context=8)
    torch.manual_seed(0)
    model = language.CharTransformer(20, cfg)
    x = torch.randint(0, 20, (4, 8))
    found = torch_adamp.find_scale_invariant(model, x)
    v_names, g_names = language.projection_weights(model)
    assert v_names and all(n.endswith("parametrizations.weight.original1") for n in v_names)
    assert len(g_names) == len(v_names)
    assert all(found[n] == "channel" for n in v_names)
    assert all(found[n] == "none" for n in g_names)
    assert all(v == "none" for n, v in found.items() if n not in v_names)
    opt = torch_adamp.AdamP(model.named_parameters(), lr=1e-3, track_stats=True)
    F.cross_entropy(model(x).reshape(-1, 20), torch.randint(0, 20, (32,))).backward()
    opt.step()
    s = opt.stats()
    assert all(s[f"{n}/view"] == 1 for n in v_names)  # channel view: each row of v is projected
    # the remedy for the cosine test's occasional layer-view projection of g: groups from the numerical check
    groups = {g["scale_invariant"]: g["param_names"] for g in torch_adamp.param_groups(model, 0.1, example_inputs=x)
              if "scale_invariant" in g}  # fmt: skip
    assert sorted(groups["channel"]) == sorted(v_names) and set(g_names) <= set(groups[False])
    plain = language.CharTransformer(20, dataclasses.replace(cfg, weight_norm=False))
    linear, none = language.projection_weights(plain)
    assert none == [] and all(torch_adamp.find_scale_invariant(plain, x)[n] == "none" for n in linear)


def test_corpus_is_the_shipped_kjv_excerpt():
    genesis, exodus = language.load_corpus()
    assert genesis.startswith("In the beginning God created the heaven and the earth.")
    assert exodus.startswith("Now these are the names of the children of Israel")
    assert genesis.count("\n") == 1533 and exodus.count("\n") == 1213  # verses
    assert "#" not in genesis + exodus


# -- audio data ---------------------------------------------------------------------------------
def test_shipped_audio_features_match_their_plan():
    train, test = audio_data.plan()
    assert (train, test) == audio_data.plan()  # deterministic
    assert {c.variant for c in train}.isdisjoint({c.variant for c in test})
    xtr, ytr, xte, yte = audio.load()
    assert xtr.shape == (len(train), 1, audio_data.N_MELS, 49) and xte.shape == (len(test), 1, audio_data.N_MELS, 49)
    assert ytr.tolist() == [c.word for c in train] and yte.tolist() == [c.word for c in test]
    assert torch.bincount(ytr).tolist() == [audio_data.TRAIN_PER_WORD] * 10
    assert abs(float(xtr.mean())) < 1e-4 and abs(float(xtr.std()) - 1) < 1e-3


def test_mel_filters_cover_the_band():
    fb = audio_data.mel_filters()
    assert fb.shape == (audio_data.N_MELS, audio_data.N_FFT // 2 + 1)
    assert fb.min() >= 0 and fb.max() <= 1
    assert (fb.argmax(1)[1:] > fb.argmax(1)[:-1]).all()  # centres rise
    assert log_mel_shape() == (audio_data.N_MELS, 49)


def log_mel_shape():
    return audio_data.log_mel(np.zeros(audio_data.RATE)).shape


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_regenerating_clips_reproduces_the_shipped_features():
    from importlib import resources

    with (resources.files("torch_adamp_reproduce") / "data" / audio_data.FILE).open("rb") as f, np.load(f) as z:
        shipped, shipped_test = z["train_features"], z["test_features"]
        version = str(z["espeak_ng_version"])
    if version != audio_data.espeak_version():
        pytest.skip(f"shipped features come from {version}, this is {audio_data.espeak_version()}")
    train, test = audio_data.plan()
    for i in (0, 777):
        diff = np.abs(audio_data.features(train[i]).astype(int) - shipped[i].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert np.abs(audio_data.features(test[3]).astype(int) - shipped_test[3].astype(int)).max() <= 1


# -- every task on a tiny budget -----------------------------------------------------------------
TINY = {
    "retrieval": lambda: retrieval.experiment(retrieval.Config(epochs=1, train_size=400, test_size=200, width=4)),
    "adversarial": lambda: adversarial.experiment(
        adversarial.Config(epochs=1, train_size=200, test_size=100, width=4, batch_size=50, eval_steps=2)
    ),
    "bias": lambda: bias.experiment(bias.Config(epochs=1, train_size=200, test_size=100, width=4, batch_size=50)),
    "language": lambda: language.experiment(
        language.Config(
            epochs=1, steps_per_epoch=4, batch_size=4, context=16, dim=16, heads=2, layers=1, eval_windows=8
        )
    ),
    "audio": lambda: audio.experiment(audio.Config(epochs=1, train_size=128, test_size=50, width=4, batch_size=32)),
}


@pytest.mark.parametrize("task", list(TINY))
def test_task_pipeline_tiny(task, tmp_path):
    exp = TINY[task]()
    res = common.run(exp, [0, 1], quiet=True, log=lambda s: None)
    assert len(res["runs"]) == 4 and res["hyperparameters"]["optimizers"] == ["adamw", "adamp"]
    per = res["summary"]["optimizers"]
    for m in exp.metrics:
        for name in ("adamw", "adamp"):
            mean, std = per[name][m.key]
            assert math.isfinite(mean) and std >= 0
        g = res["summary"]["gains"]["adamp"][m.key]
        assert g["verdict"] in ("gain", "loss", "within noise") and len(g["per_seed"]) == 2
    assert per["adamw"]["projected_fraction"] is None and 0 <= per["adamp"]["projected_fraction"] <= 1
    run = res["runs"][1]
    assert run["optimizer"] == "adamp" and set(run["projected_by_weight"]) >= set(exp.tracked(exp.make_model()))
    assert len(run["curves"]["eval_epoch"]) == len(run["curves"][exp.metrics[0].key])
    assert all(v > 0 for v in run["curves"]["effective_step"][:-1])
    assert common.plot(res, tmp_path).stat().st_size > 10_000
    json.dumps(res)  # results.json is plain JSON
    assert "AdamP - AdamW" in common.format_table(exp, res["summary"])


def test_same_seed_same_run():
    exp = TINY["bias"]()
    a = common.train_one(exp, "adamp", 3)
    b = common.train_one(exp, "adamp", 3)
    assert a.metrics == b.metrics and a.curves["loss"] == b.curves["loss"]
    c = common.train_one(exp, "adamw", 3)
    assert c.curves["eval_epoch"] == a.curves["eval_epoch"]


def test_projected_twin_keeps_the_norm_down():
    """The paper's mechanism on the retrieval network (no weight decay, so that only the updates move the
    norm): AdamW's updates grow the scale-invariant weights; AdamP's projected ones grow them far less
    (only by the second-order ``|dw|^2``), so its effective step ``lr / |w|^2`` stays larger."""
    exp = retrieval.experiment(retrieval.Config(epochs=4, batch_size=25, train_size=400, test_size=200, width=4))
    exp = dataclasses.replace(exp, weight_decay=0.0, lr=1e-2)
    w = common.train_one(exp, "adamw", 0)
    p = common.train_one(exp, "adamp", 0)
    grow_w = w.curves["weight_norm"][-1] - w.curves["weight_norm"][0]
    grow_p = p.curves["weight_norm"][-1] - p.curves["weight_norm"][0]
    assert grow_w > 5 * grow_p > 0
    assert p.mean_effective_step > w.mean_effective_step
    assert p.projected_fraction is not None and p.projected_fraction > 0.9


def test_classification_wraps_compare(tmp_path):
    res = classification.run(
        1, [0], quiet=True, log=lambda s: None, out=tmp_path,
        image_size=8, train_size=200, test_size=50, batch_size=20, width=4,
    )  # fmt: skip
    assert set(res["summary"]["optimizers"]) == set(compare.OPTIMIZERS)
    assert set(res["summary"]["gains"]) == {"sgdp", "adamp"}
    assert (tmp_path / "compare.png").is_file()
    res["paper"], res["wall_seconds"] = classification.PAPER, 1.0
    table = tasks.markdown_table({"classification": res})
    assert table.count("\n| classification |") == 2 and "SGD " in table and "AdamW " in table


# -- the command line ------------------------------------------------------------------------------
def test_cli_lists_tasks_and_rejects_unknown_ones(capsys):
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in tasks.TASKS)
    assert cli.main(["reproduce", "nosuch"]) == 2
    assert "unknown task(s) nosuch" in capsys.readouterr().err


def test_cli_runs_tasks_and_writes_the_summary(monkeypatch, tmp_path, capsys):
    tiny = {n: dataclasses.replace(t, build=lambda epochs, n=n: TINY[n](), seeds=2) for n, t in tasks.TASKS.items()}
    monkeypatch.setattr(tasks, "TASKS", {n: tiny[n] for n in ("bias", "language")})
    assert cli.main(["reproduce", "bias", "language", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "paper: " in out and "| bias | unbiased acc (%) |" in out
    for n in ("bias", "language"):
        res = json.loads((tmp_path / n / "results.json").read_text())
        assert res["paper"] == tasks.TASKS[n].paper and len(res["runs"]) == 4
        assert (tmp_path / n / "curves.png").is_file()
    assert (tmp_path / "summary.md").read_text().count("\n") == 2 + 2 + 1
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"bias", "language"}


def test_cli_summary_keeps_the_tasks_of_earlier_runs(monkeypatch, tmp_path, capsys):
    """Each ``reproduce TASK`` run rewrites summary.md and summary.json with every task whose results.json is
    in OUT (this run's and earlier runs'), in the order of the task list; the printed table is this run's."""
    tiny = {n: dataclasses.replace(t, build=lambda epochs, n=n: TINY[n](), seeds=2) for n, t in tasks.TASKS.items()}
    monkeypatch.setattr(tasks, "TASKS", {n: tiny[n] for n in ("bias", "language")})
    assert cli.main(["reproduce", "language", "--out", str(tmp_path), "-q"]) == 0
    assert cli.main(["reproduce", "bias", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "with language from earlier runs" in out
    md = (tmp_path / "summary.md").read_text()
    assert md.index("| bias |") < md.index("| language |")  # the task list's order
    assert list(json.loads((tmp_path / "summary.json").read_text())) == ["bias", "language"]
    (tmp_path / "language" / "results.json").write_text("{not json")  # a broken file is left out, not fatal
    assert cli.main(["reproduce", "bias", "--out", str(tmp_path), "-q"]) == 0
    assert "| language |" not in (tmp_path / "summary.md").read_text()


def test_a_single_seed_has_no_standard_error_and_says_so(monkeypatch, tmp_path, capsys):
    """A single seed has no standard error: the tables say n/a (and the verdict "one seed"), never nan."""
    tiny = {n: dataclasses.replace(t, build=lambda epochs, n=n: TINY[n](), seeds=2) for n, t in tasks.TASKS.items()}
    monkeypatch.setattr(tasks, "TASKS", {"bias": tiny["bias"]})
    assert cli.main(["reproduce", "bias", "--seeds", "1", "--out", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"\bnan\b", out, re.I) and "one seed" in out and "n/a" in out
    assert not re.search(r"\bnan\b", (tmp_path / "summary.md").read_text(), re.I)


def test_default_budgets_are_the_documented_ones():
    """docs/reproduction.md states these; a change must update the doc."""
    assert [(n, t.seeds) for n, t in tasks.TASKS.items()] == [
        ("classification", 3), ("retrieval", 5), ("detection", 3), ("adversarial", 3), ("bias", 5),
        ("language", 3), ("language-plain", 3), ("audio", 3),
    ]  # fmt: skip
