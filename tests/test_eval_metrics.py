"""The trade-off metrics (diversity, Vendi, spectral distance) and the Pareto front / plot, against hand-worked
cases and independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.collections import PathCollection
from PIL import Image

from rdt_lib.errors import InputError
from rdt_lib.evaluation import (
    grouped_diversity,
    pairwise_cosine_diversity,
    pareto_figure,
    pareto_front,
    save_figure,
    spectral_distance,
    vendi_score,
)


# ----------------------------------------------------------------------------- pairwise cosine diversity


def test_diversity_of_identical_embeddings_is_zero_and_of_orthogonal_ones_is_one() -> None:
    same = torch.tensor([[0.3, -1.2, 2.0]]).repeat(5, 1) * torch.tensor([[1.0], [2.0], [0.5], [7.0], [1.5]])
    assert pairwise_cosine_diversity(same) == pytest.approx(0.0, abs=1e-12)
    ortho = torch.eye(6)[:4] * torch.tensor([[1.0], [3.0], [0.2], [5.0]])  # lengths do not matter
    assert pairwise_cosine_diversity(ortho) == pytest.approx(1.0, abs=1e-12)


def test_diversity_hand_worked_three_vectors() -> None:
    # cos(e1,e2) = 0, cos(e1,e1+e2) = cos(e2,e1+e2) = 1/sqrt(2): mean over 3 pairs = sqrt(2)/3
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert pairwise_cosine_diversity(e) == pytest.approx(1.0 - math.sqrt(2.0) / 3.0, abs=1e-12)


def test_grouped_diversity_averages_groups_with_equal_weight() -> None:
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0],  # group "a": 1 - sqrt(2)/3
                      [2.0, 0.0], [5.0, 0.0]])  # group "b": identical directions, 0
    expected = ((1.0 - math.sqrt(2.0) / 3.0) + 0.0) / 2.0
    assert grouped_diversity(e, ["a", "a", "a", "b", "b"]) == pytest.approx(expected, abs=1e-12)
    # interleaved keys give the same groups
    assert grouped_diversity(e[[0, 3, 1, 4, 2]], ["a", "b", "a", "b", "a"]) == pytest.approx(expected, abs=1e-12)


def test_diversity_bad_input_errors() -> None:
    with pytest.raises(InputError, match="at least 2"):
        pairwise_cosine_diversity(torch.ones(1, 4))
    with pytest.raises(InputError, match="all zeros"):
        pairwise_cosine_diversity(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(InputError, match="group 'lonely'"):
        grouped_diversity(torch.eye(3), ["p", "p", "lonely"])
    with pytest.raises(InputError, match="one key per row"):
        grouped_diversity(torch.eye(3), ["p", "p"])
    with pytest.raises(InputError, match=r"\[N, D\]"):
        pairwise_cosine_diversity(torch.ones(3))


# ----------------------------------------------------------------------------- Vendi score


def test_vendi_of_identical_items_is_one_and_of_orthogonal_items_is_n() -> None:
    assert vendi_score(torch.tensor([[1.0, 2.0, -1.0]]).repeat(7, 1)) == pytest.approx(1.0, abs=1e-9)
    for n in (2, 5):
        assert vendi_score(torch.eye(8)[:n] * 3.0) == pytest.approx(float(n), abs=1e-9)


def test_vendi_hand_computed_two_items() -> None:
    # cos = 0.6: K/2 = [[.5,.3],[.3,.5]] has eigenvalues 0.8 and 0.2
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)  # float32 0.6 is not exact
    expected = math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))
    assert 1.0 < expected < 2.0
    assert vendi_score(e) == pytest.approx(expected, abs=1e-12)


def test_vendi_matches_the_n_by_n_kernel_definition_when_n_exceeds_d() -> None:
    # N > D takes the D x D route; the definition's N x N cosine kernel, computed here, must give the same value
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    u = x / x.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(u @ u.T / 40).clamp_min(0)
    lam = lam[lam > 1e-12]
    expected = math.exp(float(-(lam * lam.log()).sum()))
    assert 1.5 < expected < 3.0
    assert vendi_score(x) == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- spectral distance

# reference: points on the axes, covariance (divided by N-1 = 3) diag(2/3, 8/3)
_REF = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])


def test_spectral_distance_of_a_set_with_itself_is_zero() -> None:
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    assert spectral_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert spectral_distance(x, x, log10=True) == pytest.approx(0.0, abs=1e-12)


def test_spectral_distance_hand_computed_2x2() -> None:
    # features: covariance [[10/3, 2], [2, 10/3]] -> eigenvalues 10/3 -+ 2 = 4/3, 16/3
    feat = torch.tensor([[2.0, 2.0], [-2.0, -2.0], [1.0, -1.0], [-1.0, 1.0]])
    expected = math.hypot(4 / 3 - 2 / 3, 16 / 3 - 8 / 3)  # sqrt(68)/3
    assert spectral_distance(_REF, feat) == pytest.approx(expected, abs=1e-12)
    assert spectral_distance(feat, _REF) == pytest.approx(expected, abs=1e-12)
    # log10 variant: both eigenvalues doubled -> each differs by log10(2)
    assert spectral_distance(_REF, feat, log10=True) == pytest.approx(math.sqrt(2) * math.log10(2), abs=1e-12)


def test_spectral_distance_pairs_sorted_eigenvalues() -> None:
    # features: covariance diag(6, 2/3); sorted spectra (2/3, 8/3) vs (2/3, 6) differ only in the largest
    feat = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    sorted_value = abs(6 - 8 / 3)
    by_axis_value = math.hypot(6 - 2 / 3, 2 / 3 - 8 / 3)  # what pairing the eigenvalues per axis would give
    assert abs(sorted_value - by_axis_value) > 1.0
    assert spectral_distance(_REF, feat) == pytest.approx(sorted_value, abs=1e-12)
    # a permuted feature axis (and a rotation) leaves the spectrum and so the distance unchanged
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) * torch.tensor([3.0, 1, 1, 0.5, 2])
    d = spectral_distance(a, b)
    assert d > 0.5
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert spectral_distance(a, b[:, perm]) == pytest.approx(d, abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert spectral_distance(a, b.double() @ q) == pytest.approx(d, abs=1e-9)


def test_spectral_distance_log10_is_finite_for_rank_deficient_sets() -> None:
    flat = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])  # no variance along y
    value = spectral_distance(_REF, flat, log10=True, floor=1e-10)
    # sorted: (0 -> floor, 1) vs (2/3, 8/3)
    expected = math.hypot(math.log10(2 / 3) - (-10.0), math.log10(8 / 3) - 0.0)
    assert value == pytest.approx(expected, abs=1e-9)
    with pytest.raises(InputError, match="feature dimensions"):
        spectral_distance(_REF, torch.ones(4, 3))
    with pytest.raises(InputError, match="at least 2"):
        spectral_distance(_REF, torch.ones(1, 2))


# ----------------------------------------------------------------------------- Pareto front


def test_pareto_front_hand_made_table() -> None:
    table = [
        (0.1, 0.9),  # A: best reward -> front
        (0.5, 0.5),  # B: front
        (0.5, 0.5),  # C: tie with B -> both kept
        (0.4, 0.4),  # D: dominated by B
        (0.3, 0.3),  # E: dominated duplicate ...
        (0.3, 0.3),  # F: ... of E, both dominated by B
        (0.1, 0.8),  # G: equal diversity to A, lower reward -> dominated
        (0.9, 0.1),  # H: most diverse -> front
        (0.9, 0.05),  # I: dominated by H (equal in one coordinate)
    ]
    assert pareto_front(table) == [True, True, True, False, False, False, False, True, False]
    # three coordinates: (1,1,0) and (0,0,1) are incomparable, (0,0,0.5) is dominated by (0,0,1)
    assert pareto_front([(1, 1, 0), (0, 0, 1), (0, 0, 0.5)]) == [True, True, False]
    assert pareto_front([]) == []
    with pytest.raises(InputError, match="coordinates"):
        pareto_front([(1, 2), (3,)])
    with pytest.raises(InputError, match="non-finite"):
        pareto_front([(1, float("nan"))])


def _scatter(ax, label: str) -> PathCollection:
    (coll,) = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_label() == label]
    return coll


def test_pareto_figure_panels_points_front_and_png(tmp_path) -> None:
    rows = [
        {"name": "base", "diversity": 0.8, "hps": 0.20, "hps_std": 0.02, "aesthetic": 5.0},
        {"name": "tuned", "diversity": 0.2, "hps": 0.30, "hps_std": 0.01, "aesthetic": 6.0},
        {"name": "switch@0.5", "diversity": 0.6, "hps": 0.28, "hps_std": 0.02, "aesthetic": 5.5},
        {"name": "lora:0.5", "diversity": 0.5, "hps": 0.25, "hps_std": 0.02, "aesthetic": 5.8},
    ]
    fig = pareto_figure(rows, rewards=["hps", "aesthetic"], diversity="diversity", title="toy")
    assert len(fig.axes) == 2
    # hps: lora:0.5 is dominated by switch@0.5; aesthetic: every point is on the front
    expected_front = {"hps": {"base", "tuned", "switch@0.5"}, "aesthetic": {"base", "tuned", "switch@0.5", "lora:0.5"}}
    for ax, reward in zip(fig.axes, ["hps", "aesthetic"]):
        pts = _scatter(ax, "schedule").get_offsets()
        assert len(pts) == len(rows)
        assert sorted(t.get_text() for t in ax.texts) == sorted(r["name"] for r in rows)
        front_pts = {tuple(p) for p in _scatter(ax, "on the front").get_offsets().tolist()}
        assert front_pts == {(r["diversity"], r[reward]) for r in rows if r["name"] in expected_front[reward]}
        (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
        xs = list(line.get_xdata())
        assert sorted(set(xs)) == sorted(r["diversity"] for r in rows if r["name"] in expected_front[reward])
    # error bars only where the rows have <reward>_std
    assert any(c.get_label() != "schedule" and not isinstance(c, PathCollection) for c in fig.axes[0].collections)
    assert all(isinstance(c, PathCollection) for c in fig.axes[1].collections)

    out = save_figure(fig, tmp_path / "sub" / "pareto.png")
    assert out == tmp_path / "sub" / "pareto.png"
    with Image.open(out) as img:
        img.load()
        assert img.format == "PNG" and img.width > 500 and img.height > 200
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["pareto.png"]  # no temporary file left


def test_pareto_figure_bad_input() -> None:
    with pytest.raises(InputError, match="no key 'hps'"):
        pareto_figure([{"name": "a", "div": 0.1}], rewards=["hps"], diversity="div")
    with pytest.raises(InputError, match="at least one reward"):
        pareto_figure([{"name": "a", "div": 0.1}], rewards=[], diversity="div")
