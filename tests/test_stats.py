"""Paired statistics of the benchmark: per-user metrics, the paired bootstrap, pairing by user, and the reading."""

import json
import math

import numpy as np
import pytest

from gti.core.errors import DataError
from gti.experiments.report_sections import reading
from gti.experiments.stats import bootstrap_interval, compare, comparisons, per_user, read_ranks


def write_preds(path, ranks: dict[int, int], order=None, target=lambda u: 100 + u):
    """predictions.jsonl as gti.finetune writes it: one line per test user, `rank` 0-based, -1 for a miss."""
    users = order if order is not None else sorted(ranks)
    rows = [{"index": i, "user": u, "target": target(u), "rank": ranks[u], "items": []} for i, u in enumerate(users)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_per_user_values_are_the_metric_codes():
    ranks = np.array([0, 1, 9, 10, -1])
    assert per_user(ranks, "recall@10").tolist() == [1, 1, 1, 0, 0]
    assert np.allclose(per_user(ranks, "ndcg@10"), [1, 1 / math.log2(3), 1 / math.log2(11), 0, 0])
    assert per_user(ranks, "recall@1").tolist() == [1, 0, 0, 0, 0]


def test_bootstrap_of_a_constant_is_that_constant_and_seeded():
    assert bootstrap_interval(np.full(50, 0.25)) == (0.25, 0.25)
    v = np.random.default_rng(1).normal(size=200)
    assert bootstrap_interval(v, seed=3) == bootstrap_interval(v, seed=3)
    lo, hi = bootstrap_interval(v)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / math.sqrt(200), rel=0.2)  # ~ normal theory


def test_identical_arms_give_an_interval_around_zero(tmp_path):
    rng = np.random.default_rng(0)
    ranks = {u: int(r) for u, r in enumerate(rng.integers(-1, 20, size=100))}
    a, b = write_preds(tmp_path / "a.jsonl", ranks), write_preds(tmp_path / "b.jsonl", ranks)
    for d in compare("x", {0: a}, "y", {0: b}):
        assert d.diff == 0 and d.lo <= 0 <= d.hi and not d.holds and d.users == 100


def test_a_clear_difference_holds(tmp_path):
    # x hits at rank 0 for 60 of 100 users, y for 20 of them: +0.4 in recall@10 and NDCG@10
    a = write_preds(tmp_path / "a.jsonl", {u: 0 if u < 60 else -1 for u in range(100)})
    b = write_preds(tmp_path / "b.jsonl", {u: 0 if u < 20 else -1 for u in range(100)})
    diffs = compare("x", {0: a}, "y", {0: b})
    assert [(d.metric, d.seed) for d in diffs] == [(m, s) for s in (0, "pooled") for m in ("recall@10", "ndcg@10")]
    for d in diffs:
        assert d.diff == pytest.approx(0.4) and d.a_mean == pytest.approx(0.6) and d.lo > 0 and d.holds
    swapped = compare("y", {0: b}, "x", {0: a})[0]
    assert swapped.diff == pytest.approx(-0.4) and swapped.hi < 0 and swapped.holds


def test_pairing_is_by_user_not_by_line(tmp_path):
    ranks = {u: (u % 5) - 1 for u in range(40)}  # -1 (miss) for every fifth user, otherwise ranks 0..3
    a = write_preds(tmp_path / "a.jsonl", ranks)
    b = write_preds(tmp_path / "b.jsonl", ranks, order=list(reversed(range(40))))  # same ranks, lines reversed
    assert read_ranks(b) == ranks
    for d in compare("x", {0: a}, "y", {0: b}):
        assert (d.diff, d.lo, d.hi) == (0, 0, 0)  # paired by line, the per-user differences would not all be 0


def test_missing_users_are_an_error_naming_the_file(tmp_path):
    a = write_preds(tmp_path / "a.jsonl", {u: 0 for u in range(10)})
    b = write_preds(tmp_path / "short.jsonl", {u: 0 for u in range(8)})
    with pytest.raises(DataError, match=r"short\.jsonl: no prediction for 2 of the 10 users.*\[8, 9\]"):
        compare("x", {0: a}, "y", {0: b})
    with pytest.raises(DataError, match=r"short\.jsonl: no prediction for 2"):
        compare("y", {0: b}, "x", {0: a})  # whichever side lacks them
    # a reference ranks every user; paired on the arm's users, its extra users are not an error
    d = compare("x", {0: a}, "y", {0: b}, users_of="b")[0]
    assert d.users == 8
    with pytest.raises(DataError, match=r"short\.jsonl: no prediction"):
        compare("y", {0: b}, "x", {0: a}, users_of="b")
    (tmp_path / "dup.jsonl").write_text('{"user": 1, "target": 3, "rank": 0}\n{"user": 1, "target": 3, "rank": 2}\n')
    with pytest.raises(DataError, match=r"dup\.jsonl, line 2: user 1 appears twice"):
        read_ranks(tmp_path / "dup.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no predictions in it"):
        read_ranks(tmp_path / "empty.jsonl")


def test_a_user_scored_on_another_held_out_item_is_an_error(tmp_path):
    """Runs of two splits (another dataset build, another max_users slice) must not be paired by user id alone."""
    a = write_preds(tmp_path / "a.jsonl", {u: 0 for u in range(10)})
    b = write_preds(tmp_path / "b.jsonl", {u: 0 for u in range(10)}, target=lambda u: 100 + u + (u >= 7))
    with pytest.raises(DataError, match=r"a\.jsonl and .*b\.jsonl: the held-out item differs for 3 of the 10 users \(user 7: item 107 in one, 108"):
        compare("x", {0: a}, "y", {0: b})


def test_pooled_averages_each_users_difference_over_the_seeds_both_have(tmp_path):
    hit, miss = {u: 0 for u in range(20)}, {u: -1 for u in range(20)}
    x = {0: write_preds(tmp_path / "x0.jsonl", hit), 1: write_preds(tmp_path / "x1.jsonl", miss),
         2: write_preds(tmp_path / "x2.jsonl", hit)}  # fmt: skip
    y = {0: write_preds(tmp_path / "y0.jsonl", miss), 1: write_preds(tmp_path / "y1.jsonl", miss)}
    diffs = {(d.metric, d.seed): d for d in compare("x", x, "y", y)}
    assert {s for _, s in diffs} == {0, 1, "pooled"}  # seed 2: y has none
    assert diffs["recall@10", 0].diff == 1 and diffs["recall@10", 1].diff == 0
    pooled = diffs["recall@10", "pooled"]
    assert pooled.seeds == [0, 1] and pooled.users == 20 and (pooled.diff, pooled.lo, pooled.hi) == (0.5, 0.5, 0.5)
    y[1] = write_preds(tmp_path / "y1.jsonl", {u: -1 for u in range(21)})
    x[1] = write_preds(tmp_path / "x1.jsonl", {u: -1 for u in range(21)})
    with pytest.raises(DataError, match="seeds 0 and 1 rank different test users"):
        compare("x", x, "y", y)


def test_comparisons_against_mean_and_random_and_the_reference(tmp_path):
    runs = {m: {0: write_preds(tmp_path / f"{m}.jsonl", {u: u % 12 - 1 for u in range(30)})}
            for m in ("random", "mean", "gti-mean")}  # fmt: skip
    sasrec = {0: write_preds(tmp_path / "sasrec.jsonl", {u: 0 for u in range(50)})}
    pairs = {(d.a, d.b) for d in comparisons(runs, {"sasrec": sasrec})}
    assert pairs == {("random", "mean"), ("gti-mean", "mean"), ("gti-mean", "random"),
                     ("sasrec", "random"), ("sasrec", "mean"), ("sasrec", "gti-mean")}  # fmt: skip


def row(a, b, metric, seed, seeds, diff, lo, hi):
    return {"a": a, "b": b, "metric": metric, "seed": seed, "seeds": seeds, "users": 300, "diff": diff, "lo": lo,
            "hi": hi, "holds": lo > 0 or hi < 0}  # fmt: skip


def test_reading_says_which_differences_hold():
    paired = [row("gti-mean", "mean", "recall@10", s, [s], d, lo, hi)
              for s, d, lo, hi in ((0, 0.02, 0.01, 0.03), (1, 0.01, -0.01, 0.03))]  # fmt: skip
    paired += [row("gti-mean", "mean", "ndcg@10", 0, [0], 0.0, -0.01, 0.01),
               row("gti-mean", "mean", "ndcg@10", 1, [1], -0.02, -0.03, -0.01)]  # holds, against the pooled sign
    paired += [row("gti-mean", "mean", "recall@10", "pooled", [0, 1], 0.015, 0.005, 0.025),
               row("gti-mean", "mean", "ndcg@10", "pooled", [0, 1], 0.001, -0.01, 0.01),
               row("random", "mean", "recall@10", "pooled", [0], -0.02, -0.03, -0.01),
               row("random", "mean", "ndcg@10", "pooled", [0], -0.01, -0.02, -0.005)]  # fmt: skip
    text = "\n".join(reading(paired))
    assert "**gti-mean − mean** (pooled over seeds 0, 1, 300 users): recall@10 +0.0150" in text
    assert "recall@10 +0.0150 [+0.0050, +0.0250] holds (gti-mean higher)" in text
    assert "NDCG@10 +0.0010 [-0.0100, +0.0100] does not hold" in text
    assert "Per seed, with the pooled sign, it holds for recall@10 in 1 of 2 (seed 0), NDCG@10 in 0 of 2, the other way in seed 1." in text
    assert "**random − mean** (seed 0 only, 300 users)" in text and "holds (mean higher)" in text
    assert "these differences hold: gti-mean > mean (recall@10); mean > random (recall@10, NDCG@10)." in text
    assert "These do not (interval contains 0): gti-mean vs mean (NDCG@10)." in text
