"""Geometry diagnostics on hand-computable matrices (docs/evaluation.md)."""

import json
import math

import pytest
import torch

from gti.analysis.diagnostics import (
    effective_rank,
    level_cosines,
    level_of,
    level_order,
    mean_cosine,
    movement,
    nearest_tokens,
    participation_ratio,
    plot_cosine_map,
    plot_cosine_maps,
    plot_spectrum,
    rsa,
    spectrum,
    summarize,
)


def test_spectrum_uncentred_and_centred():
    E = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert spectrum(E).tolist() == pytest.approx([4.0, 3.0])
    # centred: rows (1.5, -2) and (-1.5, 2) = +-v with |v| = 2.5: one singular value sqrt(2) * 2.5
    assert spectrum(E, centered=True).tolist() == pytest.approx([2.5 * math.sqrt(2), 0.0], abs=1e-9)
    assert spectrum(torch.ones(4, 3), centered=True).abs().max() < 1e-12  # mean init: nothing left


def test_effective_rank_hand_cases():
    assert effective_rank(spectrum(torch.eye(5))) == pytest.approx(5.0)  # flat spectrum -> n
    assert effective_rank(spectrum(torch.ones(4, 3))) == pytest.approx(1.0)  # rank one -> 1
    assert effective_rank(torch.tensor([2.0, 2.0, 0.0])) == pytest.approx(2.0)
    # s = (3, 1): p = (.75, .25) -> exp(-(.75 ln .75 + .25 ln .25))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert effective_rank(torch.zeros(3)) == 0.0


def test_participation_ratio_hand_cases():
    assert participation_ratio(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(2.0)
    assert participation_ratio(torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    # s = (2, 1): lambda = (4, 1) -> 25 / 17
    assert participation_ratio(torch.tensor([2.0, 1.0])) == pytest.approx(25 / 17)
    assert participation_ratio(spectrum(torch.eye(6))) == pytest.approx(6.0)


def test_cosines():
    assert mean_cosine(torch.eye(4)) == pytest.approx(0.0)  # orthonormal rows
    assert mean_cosine(torch.ones(3, 2)) == pytest.approx(1.0)
    # pairs: (1,0)-(1,1) -> 1/sqrt2, (1,0)-(0,1) -> 0, (1,1)-(0,1) -> 1/sqrt2: mean sqrt2/3
    assert mean_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])) == pytest.approx(math.sqrt(2) / 3)
    assert math.isnan(mean_cosine(torch.ones(1, 2)))
    E = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    # the fifth row is not an SID token (level -1): left out of both averages
    assert level_cosines(E, [0, 0, 1, 1, -1]) == {"within": pytest.approx(1.0), "across": pytest.approx(0.0)}


def test_rsa_of_itself_is_one_and_collapsed_is_zero():
    E = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    r = rsa(E, E)
    assert r["pearson"] == pytest.approx(1.0) and r["spearman"] == pytest.approx(1.0)
    assert rsa(E * 3, E)["spearman"] == pytest.approx(1.0)  # cosines ignore scale
    assert rsa(torch.ones(10, 4), E) == {"pearson": 0.0, "spearman": 0.0}
    with pytest.raises(ValueError, match="code vectors"):
        rsa(E, E[:5])


def test_level_of_and_order():
    assert [level_of(t) for t in ["<a_12>", "<c_0>", "hello", "<a-1>"]] == [0, 2, -1, -1]
    assert level_order(["<b_0>", "word", "<a_10>", "<a_2>"]) == [3, 2, 0, 1]


class IdTokenizer:
    def decode(self, ids):
        return f"t{ids[0]}"


def test_nearest_tokens_are_decoded():
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    # row 1 (2, .1): cos .999 with t0, .74 with t2; row 2 (-.1, -1): cos .0995 with t3, -.0995 with t0
    got = nearest_tokens(torch.tensor([[2.0, 0.1], [-0.1, -1.0]]), old, IdTokenizer(), k=2)
    assert got == [["t0", "t2"], ["t3", "t0"]]


def test_summary_is_json_and_plots_are_pngs(tmp_path, tokenizer):
    E = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    old = torch.randn(100, 8, generator=torch.Generator().manual_seed(1))
    s = summarize(E, levels=[0, 0, 0, 1, 1, 1], code_vectors=E, old_rows=old, tokenizer=tokenizer, token_names=list("abcdef"))
    assert s["rsa"]["spearman"] == pytest.approx(1.0)
    assert list(s["nearest_tokens"]) == ["a", "c", "f"] and all(len(v) == 5 for v in s["nearest_tokens"].values())
    assert len(s["singular_values"]) == 6 and set(s["level_cosine"]) == {"within", "across"}
    json.dumps(s, allow_nan=False)  # strict JSON
    one = summarize(torch.ones(1, 3))
    assert one["mean_cosine"] is None and json.dumps(one, allow_nan=False)
    plot_spectrum({"a": E, "b": E * 2, "mean": torch.ones(6, 8)}, tmp_path / "s.png")
    plot_cosine_map(E, list(range(6)), tmp_path / "c.png", "t")
    plot_cosine_maps({"a": E, "b": E}, tmp_path / "sub" / "cs.png")
    for f in ("s.png", "c.png", "sub/cs.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["c.png", "cs.png", "s.png"]  # no tmp left


def test_movement_hand_cases():
    start = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    moved = movement(start, torch.tensor([[2.0, 0.0], [0.0, -1.0]]))  # diff [[1, 0], [0, -2]]: sqrt(5) / sqrt(2)
    assert moved == pytest.approx({"relative_change": math.sqrt(2.5), "cosine_to_start": 0.0, "norm_ratio": 1.5})
    assert movement(start, start) == pytest.approx({"relative_change": 0.0, "cosine_to_start": 1.0, "norm_ratio": 1.0})
    # a random table moved to another random table: rank and mean cosine unchanged, yet nothing stayed in place
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 64, generator=g), torch.randn(200, 64, generator=g)
    assert abs(effective_rank(spectrum(a)) - effective_rank(spectrum(b))) < 5 and abs(mean_cosine(a) - mean_cosine(b)) < 0.01
    far = movement(a, b)
    assert far["relative_change"] == pytest.approx(math.sqrt(2), abs=0.05) and abs(far["cosine_to_start"]) < 0.05
    zero = movement(torch.zeros(3, 2), torch.ones(3, 2))  # from zero init nothing is relative: null, valid JSON
    assert zero == {"relative_change": None, "cosine_to_start": None, "norm_ratio": None}
    json.dumps(zero, allow_nan=False)
