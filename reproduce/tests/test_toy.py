"""The toy problems reproduce the paper's numbers (torch_adamp_reproduce/toy.py)."""

from __future__ import annotations

import math

import pytest
import torch

from torch_adamp_reproduce import toy


@pytest.fixture(scope="module")
def results_2d() -> dict[float, dict[str, toy.Trajectory]]:
    return toy.run_2d()


@pytest.mark.parametrize("beta", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("method", toy.METHODS_2D)
def test_2d_final_norms_match_the_paper(results_2d, beta: float, method: str) -> None:
    paper = toy.PAPER_NORMS_2D[beta][method]
    got = results_2d[beta][method].final_norm
    assert got == pytest.approx(paper, rel=0.03), f"{toy.LABELS[method]}, momentum {beta}: {got:.3f} vs {paper}"


def test_2d_projection_converges_and_keeps_the_effective_step(results_2d) -> None:
    for runs in results_2d.values():
        proj, mom = runs["projection"], runs["momentum"]
        assert proj.loss < 1e-6
        # effective step size lr/|w|^2 stays within 25% of lr with the projection
        assert float((0.01 / proj.norms**2).min()) > 0.0075
        assert float(proj.norms[-1]) < float(mom.norms[-1])


def test_2d_start_is_unit_norm_and_nearly_opposite() -> None:
    w0 = torch.tensor(toy.start_2d(), dtype=torch.float64)
    assert float(w0.norm()) == pytest.approx(1.0)
    cos = float(w0 @ torch.tensor(toy.W_STAR, dtype=torch.float64))
    assert cos < math.cos(math.radians(179.5))


def test_2d_loss_is_scale_invariant() -> None:
    w = torch.tensor([0.3, -1.2], dtype=torch.float64)
    assert float(toy.loss_2d(w)) == pytest.approx(float(toy.loss_2d(7.5 * w)))


def test_3d_story() -> None:
    """Momentum: radius grows, stalls short of the optimum; weight decay: radius peaks then
    shrinks; projection: radius stays ~1.1 and the optimum is reached."""
    r = toy.run_3d()
    w = torch.tensor(toy.start_3d(), dtype=torch.float64)
    assert float(w.norm()) == pytest.approx(1.0)
    assert [float(c) for c in toy.plane_coords(w)] == pytest.approx(list(toy.ROSEN_START))

    def dist(t: toy.Trajectory) -> float:
        x, y = (float(c) for c in toy.plane_coords(t.weights[-1]))
        return math.hypot(x - 1.0, y - 1.0)

    mom, wd, proj = r["momentum"], r["weight_decay"], r["projection"]
    assert mom.final_norm > 2.5 and dist(mom) > 0.3
    assert float(wd.norms.max()) > 2.0 and wd.final_norm < 1.0
    assert proj.final_norm < 1.2 and dist(proj) < 0.1
    assert proj.loss < min(mom.loss, wd.loss)


def test_tables_mention_every_method(results_2d) -> None:
    text = toy.format_table_2d(results_2d, steps=500, lr=0.01)
    assert all(toy.LABELS[m] in text for m in toy.METHODS_2D)
    assert "[27.87]" in text
