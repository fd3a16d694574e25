"""Slices of a dataset for demos and tests, and the item text the stages read."""

from __future__ import annotations

from __future__ import annotations
import copy
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
import torch
from gti import STARTED
from gti.core.config import DataConfig, SidsConfig, TrainerConfig, to_dict, to_yaml
from gti.data.dataset import Dataset, dataset_file, item_text, load_dataset
from gti.core.errors import ConfigError
from gti.core.io import atomic_write_text, file_sha256, write_json
from gti.tokens.vocab import NewTokens, add_tokens, read_tokens_file, resize, set_rows, sid_descriptions, sid_tokens


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
