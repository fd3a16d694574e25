"""Top-K recommendation metrics with a single relevant item per example (docs/evaluation.md).

torchmetrics' RetrievalRecall drops predictions with scores <= 0, and beam scores are log-probs, so
we keep our own small Metric over *ranks*: the 0-based position of the target in the de-duplicated
item list the decoder returned, -1 for a miss. The baselines below go through the same code.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def rank_of(target: int, items: list[int]) -> int:
    """0-based position of `target` in a ranked item list, -1 if it is not there."""
    for pos, item in enumerate(items):
        if item == target:
            return pos
    return -1


class RankingMetrics(Metric):
    """Recall@K and NDCG@K from per-example ranks, each example counted once.

    Under DDP the validation sampler pads the last batch with repeated examples, so states are keyed by
    the global example index and `compute` keeps the first occurrence of each index.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = (1, 5, 10, 20), **kwargs):
        super().__init__(**kwargs)
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive cut-offs, got {ks}")
        self.ks = tuple(int(k) for k in ks)
        self.add_state("indices", default=[], dist_reduce_fx="cat")
        self.add_state("ranks", default=[], dist_reduce_fx="cat")

    def update(self, indices: torch.Tensor, ranks: torch.Tensor) -> None:
        indices, ranks = torch.as_tensor(indices), torch.as_tensor(ranks)
        if indices.dim() != 1 or indices.shape != ranks.shape:
            raise ValueError(f"indices and ranks must be 1-D of equal length, got {indices.shape}, {ranks.shape}")
        self.indices.append(indices.long().to(self.device))
        self.ranks.append(ranks.long().to(self.device))

    def compute(self) -> dict[str, float | int]:
        # after a DDP sync the list states arrive already concatenated into one tensor
        indices, ranks = (_cat(s) for s in (self.indices, self.ranks))
        # first occurrence of each example index: min position over the positions sharing that index
        uniq, inverse = torch.unique(indices, return_inverse=True)
        pos = torch.arange(indices.numel(), device=indices.device)
        first = torch.full((uniq.numel(),), indices.numel(), dtype=torch.long, device=indices.device)
        first = first.scatter_reduce(0, inverse, pos, reduce="amin")
        ranks = ranks[first].double()  # (U,)
        count = ranks.numel()
        out: dict[str, float | int] = {}
        hit_gain = 1.0 / torch.log2(ranks.clamp(min=0) + 2.0)  # single relevant item: DCG = IDCG * this
        for k in self.ks:
            hit = (ranks >= 0) & (ranks < k)
            out[f"recall@{k}"] = float(hit.double().sum() / count) if count else 0.0
            out[f"ndcg@{k}"] = float((hit_gain * hit).sum() / count) if count else 0.0
        out["count"] = count
        return out


def _cat(state) -> torch.Tensor:
    if isinstance(state, list):
        return dim_zero_cat(state) if state else torch.empty(0, dtype=torch.long)
    return state


def ndcg_at(rank: int, k: int) -> float:
    """NDCG@k of one example with a single relevant item at 0-based `rank` (-1 = miss)."""
    return 1.0 / math.log2(rank + 2) if 0 <= rank < k else 0.0


def popularity_ranking(train_inter: dict[int, list[int]], k: int) -> list[int]:
    """The k items seen most often in training sequences; ties go to the smaller item id."""
    counts = Counter(item for seq in train_inter.values() for item in seq)
    return sorted(counts, key=lambda item: (-counts[item], item))[:k]


def random_ranking(num_items: int, k: int, generator: torch.Generator) -> list[int]:
    """k distinct items drawn uniformly: the chance-level reference for Recall@K (= k / num_items)."""
    return torch.randperm(num_items, generator=generator)[:k].tolist()


def versus_popularity(test: dict, popularity: dict, ks: list[int]) -> str:
    """One line for the end of a run: the model against most-popular on the same test users, in hits at
    K = 10 (or the largest K when 10 is not among them), with NDCG beside it."""
    k, n = (10 if 10 in ks else max(ks)), int(test["count"])
    ours, theirs = round(float(test[f"recall@{k}"]) * n), round(float(popularity[f"recall@{k}"]) * n)
    verdict = "beats" if ours > theirs else "ties with" if ours == theirs else "does not beat"
    return (
        f"the model {verdict} popularity on these {n} test users: {ours} hits in the top {k} against {theirs} "
        f"(NDCG@{k} {float(test[f'ndcg@{k}']):.4f} vs {float(popularity[f'ndcg@{k}']):.4f})"
    )
