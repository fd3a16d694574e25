"""A dataset with its SID index, prepared and built on demand for the packaged MovieLens sets."""

from __future__ import annotations

from gti.core.config import DataConfig, SidsConfig
from gti.data.convert import ensure_prepared
from gti.data.dataset import Dataset, load_dataset
from gti.data.slices import subset


def ensure_dataset(data: DataConfig, sids: SidsConfig) -> Dataset:
    """Load data/NAME with its SID index; prepare MovieLens and build a missing index on demand.
    An existing index built with other settings than `sids` is a ConfigError (only sids.force=true rebuilds)."""
    ensure_prepared(data.name, data.root)
    from gti.indexing.build import run as build_sids

    sids.data = data
    # builds a missing index; an existing one is used only when it matches `sids` (or was imported,
    # or has no report): a stage never replaces an index that finished runs depend on (docs/traps.md)
    build_sids(sids, stage=True)
    ds = load_dataset(data.root, data.name, need_index=True)
    return subset(ds, data.max_users, data.max_items)
