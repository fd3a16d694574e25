"""Semantic-ID maths in plain numpy / torch (docs/data.md): residual k-means, the dedup level that
makes SIDs collision-free, token strings, code usage, and the repair of foreign indexes (their checks and
analysis are in `gti.data.sid_index`).

No Lightning and no file I/O here; the RQ-VAE lives in `gti.indexing.rqvae`, the CLI in `gti.sids`.
"""

from __future__ import annotations

import math
import string

import numpy as np
import torch
from tqdm.auto import tqdm

from gti.core.errors import DataError
from gti.data.dataset import parse_sid_token
from gti.data.sid_index import analyze_index, code_usage

LETTERS = string.ascii_lowercase
ASSIGN_CHUNK = 65_536  # rows per distance block: keeps (chunk, K) small for 1M-item catalogues
SINKHORN_EPS = 0.05  # balanced k-means: temperature relative to the mean squared distance
SINKHORN_ITERS = 20  # per Lloyd iteration (warm-started, so a few suffice)


# ----------------------------------------------------------------------------------------- k-means
def _assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre per row (ties -> lowest index) and its squared distance. x (n, d), centers (K, d)."""
    idx, dist = [], []
    c2 = (centers * centers).sum(1)  # (K,)
    for start in range(0, x.shape[0], ASSIGN_CHUNK):
        xb = x[start : start + ASSIGN_CHUNK]
        d = ((xb * xb).sum(1, keepdim=True) - 2 * xb @ centers.T + c2).clamp_min_(0)  # (b, K)
        i = d.argmin(1)
        idx.append(i)
        dist.append(d.gather(1, i[:, None]).squeeze(1))
    return torch.cat(idx), torch.cat(dist)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D² sampling) with a seeded generator.

    With fewer distinct points than k the sampling runs out of mass; the remaining rows repeat the
    chosen centres cyclically. Repeats never win an assignment (argmin ties go to the lower index),
    so those codes simply stay unused.
    """
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(1)  # (n,)  exact zeros for duplicate rows
    while len(chosen) < k:
        total = d2.sum()
        if total <= 0:
            break
        nxt = int(torch.multinomial(d2 / total, 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    rows = torch.tensor(chosen)[torch.arange(k) % len(chosen)]
    return x[rows].clone()


def _balanced_assign(
    x: torch.Tensor, centers: torch.Tensor, v: torch.Tensor, eps: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Size-balanced assignment: Sinkhorn (log domain) on exp(-dist / (eps * mean dist)) with rows
    summing to 1 and columns to n/K, then each row takes its best column of the balanced plan.
    `v` (K,) are the column potentials, warm-started across Lloyd iterations. Returns (assign, dist, v)."""
    d = torch.cat([
        ((xb * xb).sum(1, keepdim=True) - 2 * xb @ centers.T + (centers * centers).sum(1)).clamp_min_(0)
        for xb in x.split(ASSIGN_CHUNK)
    ])  # (n, K)
    n, k = d.shape
    logits = -d / (eps * d.mean().clamp_min(1e-12))
    for _ in range(iters):
        u = -torch.logsumexp(logits + v, 1, keepdim=True)  # (n, 1) rows sum to 1
        v = math.log(n / k) - torch.logsumexp(logits + u, 0)  # (K,) columns sum to n/K
    assign = (logits + v).argmax(1)
    return assign, d.gather(1, assign[:, None]).squeeze(1), v


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int,
    gen: torch.Generator,
    balanced: bool = False,
    desc: str = "k-means",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm from k-means++ seeds -> (centers (k, d), assignment (n,)). Deterministic for a
    generator state. An empty cluster is re-seeded on the point farthest from its centre (the i-th
    empty cluster takes the i-th farthest point); it keeps its old centre when every point sits on one.

    balanced=True replaces the nearest-centre step by a Sinkhorn-balanced one (clusters of about n/k
    items, as in OneRec's balanced RQ-KMeans). Deep residual levels are close to isotropic noise, where
    plain k-means puts most items in one cluster and SIDs collide; balancing spends every level's
    log2(k) bits.
    """
    centers = _kmeans_pp(x, k, gen)
    v = torch.zeros(k)

    def assign_step(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal v
        if not balanced:
            return _assign(x, c)
        a, dist, v = _balanced_assign(x, c, v, SINKHORN_EPS, SINKHORN_ITERS)
        return a, dist

    assign, dist = assign_step(centers)
    bar = tqdm(range(iters), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        counts = torch.bincount(assign, minlength=k)  # (k,)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].to(x.dtype), centers)
        empty = torch.nonzero(counts == 0).squeeze(1)
        if len(empty):
            far = torch.argsort(dist, descending=True, stable=True)[: len(empty)]
            far = far[dist[far] > 0]
            new[empty[: len(far)]] = x[far]
        centers = new
        new_assign, dist = assign_step(centers)
        changed = int((new_assign != assign).sum())
        assign = new_assign
        bar.set_postfix(changed=changed, sse=f"{float(dist.sum()):.4g}", refresh=False)
        if changed == 0:
            break
    bar.close()
    return centers, assign


def rq_kmeans(
    X: np.ndarray, levels: int, codes: int, iters: int = 50, seed: int = 0, balanced: bool = True, progress: bool = True
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Residual k-means: level l clusters what levels < l left unexplained.

    X (n, d) -> codes (n, levels) int64 and `levels` codebooks of shape (codes, d). The quantised
    reconstruction of item i is sum_l codebooks[l][codes[i, l]].
    """
    x = torch.as_tensor(np.asarray(X, dtype=np.float32))
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"rq_kmeans needs a non-empty (n, d) matrix, got shape {tuple(x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    residual = x.clone()
    out_codes, books = [], []
    for level in range(levels):
        centers, assign = kmeans(residual, codes, iters, gen, balanced, f"rq-kmeans level {level}", progress)
        residual = residual - centers[assign]
        out_codes.append(assign)
        books.append(centers.numpy())
    return torch.stack(out_codes, 1).numpy().astype(np.int64), books


def reconstruct(codes: np.ndarray, codebooks: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """(n, L) codes -> (n, d): the sum over levels of the chosen code vectors."""
    return sum(np.asarray(codebooks[level])[codes[:, level]] for level in range(codes.shape[1]))


# ----------------------------------------------------------------------------------------- dedup
def _rank_in_group(group: np.ndarray) -> np.ndarray:
    """For group ids (n,): how many earlier rows share the row's group (0 for the first)."""
    n = len(group)
    order = np.argsort(group, kind="stable")  # stable: earlier items first within a group
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    return rank


def dedup_level(codes: np.ndarray) -> tuple[np.ndarray, dict]:
    """Append a column numbering the items that share a prefix (0, 1, 2, ... in item order) so the
    full SIDs are distinct by construction.

    stats: collisions_before (items whose prefix is shared with an earlier item), colliding_items
    (items in a shared bucket), colliding_prefixes (shared buckets), max_bucket (largest bucket =
    codes the dedup level needs), largest_bucket (its items, first 10), unique_prefixes.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = codes.shape[0]
    _, group, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    rank = _rank_in_group(group)
    largest = int(np.argmax(counts))
    stats = {
        "items": int(n),
        "unique_prefixes": int(len(counts)),
        "collisions_before": int(n - len(counts)),
        "colliding_items": int(counts[counts > 1].sum()),
        "colliding_prefixes": int((counts > 1).sum()),
        "max_bucket": int(counts.max()),
        "largest_bucket": np.flatnonzero(group == largest)[:10].tolist(),
    }
    return np.concatenate([codes, rank[:, None]], axis=1), stats


def to_tokens(codes: np.ndarray, letters: str = LETTERS) -> list[list[str]]:
    """(n, L) codes -> per item ['<a_12>', '<b_7>', ...]: level l uses letters[l]."""
    codes = np.asarray(codes)
    if codes.shape[1] > len(letters):
        raise ValueError(f"{codes.shape[1]} levels but only {len(letters)} level letters")
    return [[f"<{letters[j]}_{c}>" for j, c in enumerate(row)] for row in codes.tolist()]


# ----------------------------------------------------------------------------------------- usage
def usage_report(codes: np.ndarray, K: int | list[int | None]) -> list[dict]:
    """Per column of `codes` (n, L): codes used (of K), entropy of the code distribution in bits
    (log2 K = perfectly balanced), items on the most popular code. K may be a list with one entry per
    column; None there (the dedup level) means 'as many codes as used'."""
    codes = np.asarray(codes)
    sizes = K if isinstance(K, list) else [K] * codes.shape[1]
    return [
        {"level": j, "letter": LETTERS[j], **code_usage(codes[:, j], sizes[j])} for j in range(codes.shape[1])
    ]


# ----------------------------------------------------------------------------------------- foreign indexes
def _new_prefix(index: dict[int, list[str]]) -> str:
    """The letter after the last used one, in its case (a,b,c -> d; A,B -> C); else any unused letter."""
    used = {p[0] for toks in index.values() for t in toks if (p := parse_sid_token(t))}
    singles = sorted(p for p in used if len(p) == 1)
    alphabet = string.ascii_uppercase if singles and all(p.isupper() for p in singles) else LETTERS
    last = max((p for p in singles if p in alphabet), default=None)
    start = alphabet.index(last) + 1 if last else 0
    for letter in alphabet[start:] + alphabet[:start]:
        if letter not in used:
            return letter
    raise DataError("cannot add a dedup level: every letter is already a SID prefix")


def repair_index(index: dict[int, list[str]]) -> tuple[dict[int, list[str]], dict]:
    """Append a dedup level (a new letter) numbering items that share a SID. Codes follow the index's
    own base (1-based indexes get <d_1>, <d_2>, ...). Also cures prefix conflicts: every SID ends in
    the new letter, which appears nowhere else. Indexes with neither problem come back unchanged."""
    report = analyze_index(index)
    if report["collisions"] == 0 and report["prefix_conflicts"] == 0:
        return dict(index), {**report, "repaired": False}
    letter = _new_prefix(index)
    items = sorted(index)
    group_of: dict[tuple, int] = {}
    groups = np.array([group_of.setdefault(tuple(index[i]), len(group_of)) for i in items], dtype=np.int64)
    rank = _rank_in_group(groups) + report["code_base"]
    repaired = {item: [*index[item], f"<{letter}_{r}>"] for item, r in zip(items, rank.tolist(), strict=True)}
    after = analyze_index(repaired)
    assert after["collisions"] == 0 and after["prefix_conflicts"] == 0
    return repaired, {**report, "repaired": True, "dedup_prefix": letter, "dedup_codes": report["max_bucket"]}
