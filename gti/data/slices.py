"""Slices of a dataset for demos and tests, and the item text the stages read."""

from __future__ import annotations

from gti.core.errors import ConfigError
from gti.data.dataset import Dataset, item_text


def subset(ds: Dataset, max_users: int, max_items: int) -> Dataset:
    """Smaller slices for demos and tests; SIDs and items stay whole so the trie is the real one.

    max_items keeps whole users (those whose every item is among the first N ids): dropping items from
    the middle of a sequence would invent transitions the user never made.
    """
    inter = ds.inter
    if max_items > 0:
        inter = {u: s for u, s in inter.items() if max(s, default=max_items) < max_items and len(s) >= 3}
        if not inter:
            raise ConfigError(f"data.max_items={max_items}: no user of {ds.name} has all items below it; raise it or use 0")
    if max_users > 0:
        inter = {u: inter[u] for u in sorted(inter)[:max_users]}
    return Dataset(ds.name, ds.root, inter, ds.items, ds.index)


def item_texts(ds: Dataset) -> dict[int, str]:
    return {i: item_text(meta) for i, meta in ds.items.items()}
