import math

import pytest
import torch

from gti.diagnostics import (
    effective_rank,
    level_cosines,
    level_of,
    mean_cosine,
    participation_ratio,
    plot_cosine_map,
    plot_cosine_maps,
    plot_spectrum,
    rsa,
    spectrum,
    summarize,
)


def test_effective_rank_and_participation_ratio_hand_cases():
    assert effective_rank(spectrum(torch.eye(5))) == pytest.approx(5.0)
    assert effective_rank(spectrum(torch.ones(4, 3))) == pytest.approx(1.0)
    s = torch.tensor([1.0, 1.0, 0.0])
    assert participation_ratio(s) == pytest.approx(2.0)
    assert participation_ratio(torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    # s = (3, 1): p = (.75, .25): exp(-(.75 ln .75 + .25 ln .25))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_cosines():
    assert mean_cosine(torch.eye(4)) == pytest.approx(0.0)
    assert mean_cosine(torch.ones(3, 2)) == pytest.approx(1.0)
    E = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert level_cosines(E, [0, 0, 1, 1]) == {"within": pytest.approx(1.0), "across": pytest.approx(0.0)}


def test_rsa_of_itself_is_one_and_collapsed_is_zero():
    E = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    r = rsa(E, E)
    assert r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)
    assert rsa(torch.ones(10, 4), E) == {"pearson": 0.0, "spearman": 0.0}


def test_level_of():
    assert [level_of(t) for t in ["<a_12>", "<c_0>", "hello", "<a-1>"]] == [0, 2, -1, -1]


def test_summary_and_plots(tmp_path, tokenizer):
    E = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    old = torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    s = summarize(E, levels=[0, 0, 0, 1, 1, 1], code_vectors=E, old_rows=old, tokenizer=tokenizer, token_names=list("abcdef"))
    assert s["rsa"]["spearman"] == pytest.approx(1.0)
    assert len(s["nearest_tokens"]) == 3 and all(len(v) == 5 for v in s["nearest_tokens"].values())
    plot_spectrum({"a": E, "b": E * 2}, tmp_path / "s.png")
    plot_cosine_map(E, list(range(6)), tmp_path / "c.png", "t")
    plot_cosine_maps({"a": E, "b": E}, tmp_path / "cs.png")
    for f in ("s.png", "c.png", "cs.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
