"""Readers of the field's raw formats. Each returns `Raw`: interaction rows + item metadata,
which `gti.data.dataset.build_sequences` turns into the native format (k-core, dedup, ids)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class Raw:
    interactions: list[tuple[Hashable, Hashable, float]]  # (user key, item key, timestamp)
    items: dict[Hashable, dict]  # item key -> {"title", "description", ...}
    source: list[str] = field(default_factory=list)  # files read (recorded in the dataset report)
