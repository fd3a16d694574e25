"""RankingMetrics and the reference baselines on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from gti.rank.metrics import RankingMetrics, ndcg_at, popularity_ranking, random_ranking, rank_of, versus_popularity


def test_rank_of():
    assert rank_of(7, [3, 7, 9]) == 1
    assert rank_of(3, [3, 7, 9]) == 0
    assert rank_of(4, [3, 7, 9]) == -1
    assert rank_of(4, []) == -1


def test_hand_computed_recall_and_ndcg():
    metric = RankingMetrics(ks=(1, 5, 10))
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    metric.update(torch.tensor([2, 3]), torch.tensor([-1, 7]))
    out = metric.compute()
    assert out["count"] == 4
    assert out["recall@1"] == pytest.approx(0.25)
    assert out["recall@5"] == pytest.approx(0.5)
    assert out["recall@10"] == pytest.approx(0.75)
    assert out["ndcg@1"] == pytest.approx(0.25)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(9)) / 4)
    assert set(out) == {"count"} | {f"{m}@{k}" for m in ("recall", "ndcg") for k in (1, 5, 10)}


def test_boundary_rank_equal_to_k_is_a_miss():
    metric = RankingMetrics(ks=(5,))
    metric.update(torch.tensor([0, 1]), torch.tensor([4, 5]))
    out = metric.compute()
    # rank 4 (the 5th item) is the last hit of @5 with gain 1/log2(4 + 2); rank 5 is a miss
    assert out["recall@5"] == pytest.approx(0.5)
    assert out["ndcg@5"] == pytest.approx(0.38685280723454163 / 2)  # 1/log2(6) = 0.386852807...
    assert ndcg_at(4, 5) == pytest.approx(0.38685280723454163)
    assert ndcg_at(5, 5) == 0.0 and ndcg_at(-1, 5) == 0.0


def test_duplicate_indices_counted_once_first_kept():
    # a DDP sampler pads with repeats: index 1 shows up again (here even with another rank)
    metric = RankingMetrics(ks=(1,))
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, -1, -1]))
    metric.update(torch.tensor([1, 0]), torch.tensor([0, 0]))
    out = metric.compute()
    assert out["count"] == 3
    assert out["recall@1"] == pytest.approx(1 / 3)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_reset_and_empty():
    metric = RankingMetrics()
    metric.update(torch.tensor([0]), torch.tensor([0]))
    metric.reset()
    out = metric.compute()
    assert out["count"] == 0 and out["recall@20"] == 0.0


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        RankingMetrics().update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError):
        RankingMetrics(ks=(0, 5))


def test_popularity_ranking_hand_case():
    train = {0: [5, 3, 5], 1: [3, 7], 2: [9, 5], 3: [7]}
    # counts: 5 -> 3, 3 -> 2, 7 -> 2, 9 -> 1; 3 beats 7 on the id tie-break
    assert popularity_ranking(train, 3) == [5, 3, 7]
    assert popularity_ranking(train, 10) == [5, 3, 7, 9]


def test_random_ranking_distinct_and_seeded():
    a = random_ranking(100, 20, torch.Generator().manual_seed(0))
    b = random_ranking(100, 20, torch.Generator().manual_seed(0))
    assert a == b and len(set(a)) == 20 and all(0 <= i < 100 for i in a)


def test_baseline_through_metric():
    train = {0: [1, 2, 2], 1: [2, 3]}
    ranking = popularity_ranking(train, 2)  # [2, 1]
    targets = [2, 1, 3]
    metric = RankingMetrics(ks=(1, 2))
    metric.update(torch.arange(3), torch.tensor([rank_of(t, ranking) for t in targets]))
    out = metric.compute()
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["recall@2"] == pytest.approx(2 / 3)


def test_versus_popularity_counts_hits_at_10():
    pop = {"recall@10": 0.05, "ndcg@10": 0.02, "recall@5": 0.03, "ndcg@5": 0.01}
    line = versus_popularity({"count": torch.tensor(100.0), "recall@10": torch.tensor(0.09), "ndcg@10": 0.04}, pop, [5, 10])
    assert line == ("the model beats popularity on these 100 test users: 9 hits in the top 10 against 5 "
                    "(NDCG@10 0.0400 vs 0.0200)")  # fmt: skip
    assert "ties with popularity" in versus_popularity({"count": 100, "recall@10": 0.05, "ndcg@10": 0.0}, pop, [10])
    below = versus_popularity({"count": 100, "recall@5": 0.01, "ndcg@5": 0.0}, pop, [1, 5])  # no K=10: the largest K
    assert "does not beat popularity" in below and "1 hits in the top 5 against 3" in below
