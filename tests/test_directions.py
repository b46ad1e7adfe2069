import pytest
import torch

from refusal_rank.directions import candidate_grid, diff_in_means, select_direction


def test_diff_in_means_float64():
    a = torch.ones(3, 2, 4)
    b = torch.zeros(5, 2, 4)
    d = diff_in_means(a, b)
    assert d.dtype == torch.float64 and torch.equal(d, torch.ones(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError):
        diff_in_means(torch.zeros(0, 2), b)


def test_candidate_grid_drops_last_layers_and_strides():
    g = candidate_grid(10, 3, 0.2, 1)
    assert max(l for l, _ in g) == 7 and len(g) == 8 * 3
    assert {l for l, _ in candidate_grid(10, 3, 0.2, 2)} == {0, 2, 4, 6}
    assert {p for _, p in candidate_grid(10, 3, 0.2, 1, [-1])} == {2}


def _dirs():
    torch.manual_seed(0)
    d = torch.randn(4, 2, 8, dtype=torch.float64)
    d[0] = 0.0  # layer 0: identical tokens, zero difference
    return d


def test_selection_takes_lowest_score_that_passes_filters():
    dirs = _dirs()
    cands = candidate_grid(4, 2, 0.0, 1)
    score = {c: float(i) for i, c in enumerate(cands)}  # (1,0) lowest among non-zero
    lookup = lambda u: next(score[c] for c in cands if dirs[c].norm() > 0 and torch.allclose(dirs[c] / dirs[c].norm(), u))
    kl = lambda u: 0.5 if torch.allclose(u, dirs[1, 0] / dirs[1, 0].norm()) else 0.05  # (1,0) fails KL
    sel = select_direction(dirs, cands, lookup, kl, lambda l, v: 1.0, progress=False)
    assert (sel.layer, sel.position) == (1, 1) and not sel.fallback
    assert (0, 0) not in sel.scores  # zero-norm candidates are skipped
    assert [(c["layer"], c["position"]) for c in sel.checked] == [(1, 0), (1, 1)]


def test_selection_fallback_when_nothing_passes():
    dirs = _dirs()
    cands = candidate_grid(4, 2, 0.0, 1)
    sel = select_direction(dirs, cands, lambda u: float(u[0]), lambda u: 1.0, lambda l, v: -1.0, max_checks=3, progress=False)
    assert sel.fallback and len(sel.checked) == 3
