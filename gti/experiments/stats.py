"""Paired statistics of two rankers on the same test users: per-user recall@K / NDCG@K read from predictions.jsonl, and
the difference of their means with a 95 % paired bootstrap interval over users (Efron & Tibshirani 1993, ch. 16),
per seed and pooled over seeds.

Pairing by user removes the between-user variance both rankers share (an easy user is easy for both), so a gap of a
few hits that an unpaired comparison cannot resolve may still hold. A difference "holds" when its interval excludes 0.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gti.core.errors import DataError

METRICS = ("recall@10", "ndcg@10")
N_BOOT = 2000  # bootstrap resamples: the interval ends move by ~0.1 of their width between seeds of the resampling
LEVEL = 0.95


class Ranks(dict):
    """user -> 0-based rank of the held-out item in that user's list (-1: not in it); `targets`: user -> that item."""

    def __init__(self):
        super().__init__()
        self.targets: dict[int, int] = {}


def read_ranks(path: str | Path) -> Ranks:
    """A predictions.jsonl as Ranks, one test example per user."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: predictions file not found")
    ranks = Ranks()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            user, target, rank = int(row["user"]), int(row["target"]), int(row["rank"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}, line {n}: expected a JSON object with 'user', 'target' and 'rank' ({e})") from None
        if user in ranks:
            raise DataError(f"{path}, line {n}: user {user} appears twice; pairing needs one test example per user")
        ranks[user], ranks.targets[user] = rank, target
    if not ranks:
        raise DataError(f"{path}: no predictions in it; a finished run writes one line per test user")
    return ranks


def check_paired(a: Ranks, a_file: Path, b: Ranks, b_file: Path, users: list[int]) -> None:
    """Both sides rank every one of `users`, each user on the same held-out item: else a DataError naming the file."""
    for ranks, path in ((a, a_file), (b, b_file)):
        missing = [u for u in users if u not in ranks]
        if missing:
            raise DataError(f"{path}: no prediction for {len(missing)} of the {len(users)} users it is paired on "
                            f"(e.g. users {missing[:5]}); both sides of a comparison must rank the same test users")  # fmt: skip
    differ = [u for u in users if a.targets[u] != b.targets[u]]
    if differ:
        u = differ[0]
        raise DataError(f"{a_file} and {b_file}: the held-out item differs for {len(differ)} of the {len(users)} users "
                        f"(user {u}: item {a.targets[u]} in one, {b.targets[u]} in the other); "
                        "paired runs must be scored on the same split")  # fmt: skip


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """(U,) recall@K (hit or not) or NDCG@K (1 / log2(rank + 2) on a hit) of each user, from 0-based ranks (U,),
    the same values gti.rank.metrics averages."""
    name, k = metric.split("@")
    hit = (ranks >= 0) & (ranks < int(k))
    if name == "recall":
        return hit.astype(np.float64)
    if name == "ndcg":
        return np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}: recall@K or ndcg@K")


def bootstrap_interval(
    values: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile interval of the mean of `values` (U,) over `n_boot` resamples of the users with replacement."""
    rng = np.random.default_rng(seed)
    u = len(values)
    means = np.empty(n_boot)
    step = max(1, 2_000_000 // max(u, 1))  # resamples per chunk: index arrays of at most ~16 MB
    for i in range(0, n_boot, step):
        idx = rng.integers(0, u, size=(min(step, n_boot - i), u))  # (chunk, U)
        means[i : i + len(idx)] = values[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Difference:
    """`a` minus `b` in one metric over the same users: `a_mean` - `b_mean` = `diff`, interval [lo, hi]."""

    a: str
    b: str
    metric: str
    seed: int | str  # a seed, or "pooled"
    seeds: list[int]  # the seeds behind it
    users: int
    a_mean: float
    b_mean: float
    diff: float
    lo: float
    hi: float

    @property
    def holds(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_json(self) -> dict:
        return {**asdict(self), "holds": self.holds}


def _paired(a: Ranks, a_file: Path, b: Ranks, b_file: Path, users: list[int] | None) -> np.ndarray:
    """(2, U) ranks of `users` (None: every user either side has) in a and b, checked by `check_paired`."""
    if users is None:
        users = sorted(a.keys() | b.keys())
    check_paired(a, a_file, b, b_file, users)
    return np.array([[a[u] for u in users], [b[u] for u in users]])


def _difference(a, b, metric, seed, seeds, va: np.ndarray, vb: np.ndarray, n_boot: int, boot_seed: int) -> Difference:
    lo, hi = bootstrap_interval(va - vb, n_boot, boot_seed)
    ma, mb = float(va.mean()), float(vb.mean())
    return Difference(a, b, metric, seed, seeds, len(va), ma, mb, ma - mb, lo, hi)


def compare(
    a: str,
    a_runs: dict[int, Path],
    b: str,
    b_runs: dict[int, Path],
    users_of: str = "both",
    metrics: tuple[str, ...] = METRICS,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> list[Difference]:
    """`a` minus `b` per seed both have (their predictions.jsonl, by seed) and pooled over those seeds: the pooled
    per-user value is that user's difference averaged over the seeds, and users are resampled.
    users_of="b": pair on b's users only (a reference that ranks every user against an arm evaluated on a subset)."""
    seeds = sorted(a_runs.keys() & b_runs.keys())
    if not seeds:
        return []
    out, pooled, user_sets = [], {m: [] for m in metrics}, {}
    for s in seeds:
        ra, rb = read_ranks(a_runs[s]), read_ranks(b_runs[s])
        users = sorted(rb) if users_of == "b" else None
        pair = _paired(ra, a_runs[s], rb, b_runs[s], users)
        user_sets[s] = users if users is not None else sorted(ra.keys() | rb.keys())
        for m in metrics:
            va, vb = per_user(pair[0], m), per_user(pair[1], m)
            out.append(_difference(a, b, m, s, [s], va, vb, n_boot, seed))
            pooled[m].append((va, vb))
    first = user_sets[seeds[0]]
    for s in seeds[1:]:
        if user_sets[s] != first:
            raise DataError(f"{a_runs[s]} and {a_runs[seeds[0]]}: seeds {seeds[0]} and {s} rank different test users "
                            f"({len(first)} vs {len(user_sets[s])}); pooling over seeds needs the same users")  # fmt: skip
    for m in metrics:  # with one seed, the pooled row is that seed's
        va = np.mean([p[0] for p in pooled[m]], axis=0)  # (U,) each user's value averaged over the seeds
        vb = np.mean([p[1] for p in pooled[m]], axis=0)
        out.append(_difference(a, b, m, "pooled", seeds, va, vb, n_boot, seed))
    return out


BASELINES = ("mean", "random")  # every arm is compared with each of these


def comparisons(arms: dict[str, dict[int, Path]], references: dict[str, dict[int, Path]]) -> list[Difference]:
    """Each arm minus `mean` and minus `random` (random − mean once, not also mean − random), and each reference
    minus each arm on that arm's users. Inputs: name -> {seed: predictions.jsonl} of the finished runs."""
    out, done = [], set()
    for base in (b for b in BASELINES if b in arms):
        for name in arms:
            if name != base and frozenset((name, base)) not in done:
                done.add(frozenset((name, base)))
                out += compare(name, arms[name], base, arms[base])
    for ref, runs in references.items():
        for name in arms:
            out += compare(ref, runs, name, arms[name], users_of="b")
    return out
