"""A SID index as data ({item: [tokens]}, ours or imported): the checks it must pass and the numbers that describe
it (lengths, code usage, collisions, prefix conflicts). Building and repairing one is `gti.indexing`'s work."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from gti.core.errors import DataError
from gti.data.dataset import parse_sid_token


def code_usage(values: list | np.ndarray, size: int | None) -> dict:
    """How evenly `values` spread over `size` codes (None: as many as used): codes used, entropy in bits, largest bucket."""
    counts = np.array(list(Counter(np.asarray(values).tolist()).values()), dtype=np.float64)
    p = counts / counts.sum()
    out = {
        "used": int(len(counts)),
        "codes": int(size) if size else int(len(counts)),
        "entropy_bits": round(max(0.0, float(-(p * np.log2(p)).sum())), 4),
        "max_bucket": int(counts.max()),
    }
    out["max_entropy_bits"] = round(math.log2(out["codes"]), 4) if out["codes"] > 0 else 0.0
    return out



def check_index(index: dict[int, list[str]], where: str, n_items: int | None = None, item_file: str = "item.json") -> None:
    """Every token looks like <x_12>; with n_items: every item 0..n_items-1 has a SID and no other key
    appears. Raises DataError naming `where` and the offending key."""
    for item in sorted(index):
        for tok in index[item]:
            if parse_sid_token(tok) is None:
                raise DataError(f"{where}: item '{item}': token {tok!r} is not a SID token like '<a_12>'")
    if n_items is None:
        return
    extra = sorted(i for i in index if i >= n_items)
    if extra:
        raise DataError(f"{where}: key '{extra[0]}' is not an item of {item_file} (items are 0..{n_items - 1})")
    missing = [i for i in range(n_items) if i not in index]
    if missing:
        shown = ", ".join(map(str, missing[:5]))
        raise DataError(f"{where}: {len(missing)} items of {item_file} have no SID, e.g. items {shown}")


def analyze_index(index: dict[int, list[str]]) -> dict:
    """Shape and collisions of any {item: [tokens]} map (letters, code base, lengths need not be ours).

    collisions: items whose SID equals an earlier item's; prefix_conflicts: items whose whole SID is a
    strict prefix of another item's (a trie cannot tell where such an item ends).
    """
    items = sorted(index)
    sids = [tuple(index[i]) for i in items]
    buckets: dict[tuple, list[int]] = {}
    for item, sid in zip(items, sids, strict=True):
        buckets.setdefault(sid, []).append(item)
    shared = [b for b in buckets.values() if len(b) > 1]
    prefixes = {sid[:k] for sid in set(sids) for k in range(1, len(sid))}
    conflicts = [i for i, sid in zip(items, sids, strict=True) if sid in prefixes]
    parsed = [[parse_sid_token(t) for t in sid] for sid in sids]
    depth = max((len(s) for s in sids), default=0)
    all_codes = [p[1] for row in parsed for p in row if p]
    report = {
        "items": len(items),
        "unique_sids": len(buckets),
        "collisions": sum(len(b) - 1 for b in shared),
        "colliding_items": sum(len(b) for b in shared),
        "colliding_sids": len(shared),
        "max_bucket": max((len(b) for b in buckets.values()), default=0),
        "examples": [{"sid": "".join(index[b[0]]), "items": b[:10], "size": len(b)} for b in sorted(shared, key=len, reverse=True)[:5]],
        "prefix_conflicts": len(conflicts),
        "prefix_conflict_example": conflicts[:5],
        "lengths": {str(k): v for k, v in sorted(Counter(len(s) for s in sids).items())},
        "code_base": 1 if all_codes and min(all_codes) == 1 else 0,
        "prefixes_by_position": [sorted({row[j][0] for row in parsed if len(row) > j and row[j]}) for j in range(depth)],
        "usage": [
            {"position": j, **code_usage([sid[j] for sid in sids if len(sid) > j], None)} for j in range(depth)
        ],
    }
    return report
