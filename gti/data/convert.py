"""Raw files of the field's formats -> the native dataset under data/NAME/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gti.core.config import PrepareConfig
from gti.core.errors import ConfigError
from gti.core.io import write_json
from gti.core.log import get_logger
from gti.data.dataset import build_sequences, dataset_file, write_dataset
from gti.data.importers import Raw
from gti.data.importers.amazon import read_amazon2014, read_amazon2018, read_amazon2023
from gti.data.importers.lcrec import import_lcrec, read_lcrec
from gti.data.importers.minionerec import read_minionerec
from gti.data.importers.movielens import read_atomic, read_movielens
from gti.data.importers.p5 import read_p5

log = get_logger("prepare")

# dataset name -> reader of raw files (an importer per format of the field, docs/data.md)
IMPORTERS: dict[str, Callable[[PrepareConfig], Raw]] = {
    "ml-100k": lambda cfg: read_movielens("ml-100k", cfg.source),
    "ml-1m": lambda cfg: read_movielens("ml-1m", cfg.source),
    "recbole": lambda cfg: read_atomic(_required_source(cfg)),
    "amazon2014": read_amazon2014,
    "amazon2018": read_amazon2018,
    "amazon2023": read_amazon2023,
    "p5": read_p5,
    "minionerec": read_minionerec,
    "lcrec": read_lcrec,  # `run` copies these native files as they are (see below)
}


def _required_source(cfg: PrepareConfig) -> str:
    if not cfg.source:
        raise ConfigError(f"dataset={cfg.dataset} needs source=PATH (the folder or file with the raw data)")
    return cfg.source


def output_name(cfg: PrepareConfig) -> str:
    if cfg.name:
        return cfg.name
    if cfg.category:
        return f"{cfg.dataset}-{cfg.category}"
    if cfg.dataset in ("recbole", "lcrec") and cfg.source:
        return Path(cfg.source).name
    return cfg.dataset


def run(cfg: PrepareConfig) -> Path:
    if cfg.dataset not in IMPORTERS:
        raise ConfigError(f"unknown dataset '{cfg.dataset}'; choose one of: {', '.join(sorted(IMPORTERS))}")
    name = output_name(cfg)
    if dataset_file(cfg.root, name, "inter").is_file() and not cfg.overwrite:
        log.info(f"{Path(cfg.root) / name} exists (overwrite=true to rebuild)")
        return Path(cfg.root) / name
    if cfg.dataset == "lcrec":  # already native: validated and copied as-is (no k-core, ids kept)
        return import_lcrec(cfg, name)
    raw = IMPORTERS[cfg.dataset](cfg)
    inter, items, stats = build_sequences(raw.interactions, raw.items, kcore=cfg.kcore)
    out = write_dataset(cfg.root, name, inter, items)
    write_json(dataset_file(cfg.root, name, "prepare_report"), {"dataset": cfg.dataset, "kcore": cfg.kcore, "source": raw.source, **stats})
    log.info(
        f"{name}: {stats['users']} users, {stats['items']} items, "
        f"{stats['interactions']} interactions after {cfg.kcore}-core -> {out}"
    )
    return out


PACKAGED = ("ml-100k", "ml-1m")  # shipped inside installed packages: prepared on first use


def ensure_prepared(name: str, root: str) -> None:
    """data/NAME exists afterwards: the packaged MovieLens sets are prepared on demand, any other dataset must have
    been prepared with `python -m gti.prepare` (ConfigError naming the missing file)."""
    if dataset_file(root, name, "inter").is_file():
        return
    if name not in PACKAGED:
        raise ConfigError(f"data.name={name}: {dataset_file(root, name, 'inter')} not found; run `python -m gti.prepare` for it first")
    run(PrepareConfig(dataset=name, root=root))
