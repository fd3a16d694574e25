"""Amazon review datasets (McAuley lab), three releases; the user brings the files (no download).

  amazon2014  reviews_<Cat>_5.json.gz (JSON lines: reviewerID, asin, unixReviewTime)
              meta_<Cat>.json.gz      (one Python literal per line: parsed with `ast.literal_eval`)
  amazon2018  <Cat>_5.json.gz (JSON lines: reviewerID, asin, unixReviewTime)
              or <Cat>.csv (ratings only: item,user,rating,timestamp, no header)
              meta_<Cat>.json.gz      (JSON lines; description and category are lists)
  amazon2023  <Cat>.jsonl[.gz] (JSON lines: user_id, parent_asin, timestamp in MILLISECONDS)
              meta_<Cat>.jsonl[.gz] (JSON lines: parent_asin, title, description list, features,
              store, categories)
Each file may also be stored uncompressed (the same name without `.gz`).

Item text -> native {"title", "description", "brand"?, "categories"?}: HTML tags removed, entities
unescaped, whitespace collapsed, description lists joined. 2023: brand = store, and the features
stand in for an empty description. Items without a title are dropped (their interactions with
them too: `rows_with_meta` in the prepare report), and the count is printed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gti.core.config import PrepareConfig
from gti.core.errors import ConfigError, DataError
from gti.core.log import get_logger
from gti.data.importers import Raw
from gti.data.importers.files import clean_text, find_files, iter_records, open_text, source_dir

log = get_logger("prepare")


def require_category(cfg: PrepareConfig, example: str) -> str:
    if not cfg.category:
        raise ConfigError(f"dataset={cfg.dataset} needs category=NAME (the file names carry it, e.g. {example})")
    return cfg.category


def field(rec: dict, key: str, where: str) -> Any:
    if key not in rec:
        raise DataError(f"{where}: missing key '{key}'")
    return rec[key]


def review_rows(path: Path, user: str, item: str, time: str, time_scale: float = 1.0) -> Iterator[tuple]:
    """(user, item, timestamp in seconds) from a JSON-lines review file."""
    for lineno, rec in iter_records(path):
        where = f"{path}: line {lineno}"
        u, i, t = (field(rec, k, where) for k in (user, item, time))
        try:
            t = float(t) / time_scale
        except (TypeError, ValueError):
            raise DataError(f"{where}: '{time}' is not a number: {t!r}") from None
        yield str(u), str(i), t


def rating_rows(path: Path) -> Iterator[tuple]:
    """Amazon 2018 ratings-only CSV: item,user,rating,timestamp (no header)."""
    with open_text(path) as f:
        for lineno, cells in enumerate(csv.reader(f), 1):
            if not cells:
                continue
            if len(cells) != 4:
                raise DataError(f"{path}: line {lineno}: expected item,user,rating,timestamp ({len(cells)} cells)")
            try:
                t = float(cells[3])
            except ValueError:
                raise DataError(f"{path}: line {lineno}: timestamp {cells[3]!r} is not a number") from None
            yield cells[1], cells[0], t


def _flat(values: Any) -> Iterator[Any]:
    if isinstance(values, (list, tuple)):
        for v in values:
            yield from _flat(v)
    elif values is not None:
        yield values


def make_item(title: Any, description: Any = "", brand: Any = "", categories: Any = None) -> dict | None:
    """Native item text, or None when there is no usable title."""
    if isinstance(title, str) and "<span id" in title:  # 2018 scraping debris in place of a title
        return None
    title = clean_text(title)
    if not title:
        return None
    item = {"title": title, "description": clean_text(description)}
    brand = re.sub(r"^by\s+", "", clean_text(brand))
    if brand:
        item["brand"] = brand
    cats = list(dict.fromkeys(c for c in (clean_text(v) for v in _flat(categories)) if c))  # ordered, unique
    if cats:
        item["categories"] = cats
    return item


def item_2014(rec: dict) -> dict | None:
    return make_item(rec.get("title"), rec.get("description"), rec.get("brand"), rec.get("categories"))


def item_2018(rec: dict) -> dict | None:
    return make_item(rec.get("title"), rec.get("description"), rec.get("brand"), rec.get("category"))


def item_2023(rec: dict) -> dict | None:
    description = rec.get("description") or rec.get("features")
    return make_item(rec.get("title"), description, rec.get("store"), rec.get("categories"))


def read_meta(path: Path, key: str, to_item: Callable[[dict], dict | None], wanted: set | None = None) -> dict:
    """item key -> native text, for the items in `wanted` (all when None); the first titled record wins."""
    items: dict = {}
    untitled: set = set()
    for lineno, rec in tqdm(iter_records(path), desc=path.name, unit=" lines", mininterval=2):
        k = str(field(rec, key, f"{path}: line {lineno}"))
        if (wanted is not None and k not in wanted) or k in items:
            continue
        item = to_item(rec)
        if item is None:
            untitled.add(k)
        else:
            items[k] = item
            untitled.discard(k)
    missing = len(wanted - items.keys() - untitled) if wanted is not None else 0
    log.info(
        f"{path.name}: {len(items)} items with a title; dropped {len(untitled)} without a title"
        + (f" and {missing} with no metadata record" if missing else "")
    )
    return items


# ----------------------------------------------------------------------------------------- releases
def _gather(rows: Iterable[tuple], files: dict[str, Path], meta_key: str, to_item: Callable) -> Raw:
    interactions = list(tqdm(rows, desc=files["reviews"].name, unit=" rows", mininterval=2))
    wanted = {i for _, i, _ in interactions}
    items = read_meta(files["meta"], meta_key, to_item, wanted)
    return Raw(interactions, items, [str(p) for p in files.values()])


def files_2014(cfg: PrepareConfig) -> dict[str, Path]:
    cat = require_category(cfg, "Beauty")
    return find_files(source_dir(cfg), {"reviews": (f"reviews_{cat}_5.json.gz",), "meta": (f"meta_{cat}.json.gz",)})


def files_2018(cfg: PrepareConfig) -> dict[str, Path]:
    cat = require_category(cfg, "Musical_Instruments")
    return find_files(
        source_dir(cfg), {"reviews": (f"{cat}_5.json.gz", f"{cat}.csv"), "meta": (f"meta_{cat}.json.gz",)}
    )


def files_2023(cfg: PrepareConfig) -> dict[str, Path]:
    cat = require_category(cfg, "All_Beauty")
    return find_files(source_dir(cfg), {"reviews": (f"{cat}.jsonl.gz",), "meta": (f"meta_{cat}.jsonl.gz",)})


def reviews_2014(path: Path) -> Iterator[tuple]:
    return review_rows(path, "reviewerID", "asin", "unixReviewTime")


def reviews_2018(path: Path) -> Iterator[tuple]:
    if path.name.endswith(".csv"):
        return rating_rows(path)
    return review_rows(path, "reviewerID", "asin", "unixReviewTime")


def reviews_2023(path: Path) -> Iterator[tuple]:
    return review_rows(path, "user_id", "parent_asin", "timestamp", time_scale=1000.0)  # ms -> s


def read_amazon2014(cfg: PrepareConfig) -> Raw:
    files = files_2014(cfg)
    return _gather(reviews_2014(files["reviews"]), files, "asin", item_2014)


def read_amazon2018(cfg: PrepareConfig) -> Raw:
    files = files_2018(cfg)
    return _gather(reviews_2018(files["reviews"]), files, "asin", item_2018)


def read_amazon2023(cfg: PrepareConfig) -> Raw:
    files = files_2023(cfg)
    return _gather(reviews_2023(files["reviews"]), files, "parent_asin", item_2023)


# ----------------------------------------------------------------------------------------- dry runs
def peek(cfg: PrepareConfig) -> list[tuple[Path, Iterator]]:
    """(file, record iterator) for `gti.protocol`'s dry run: it parses the first few of each."""
    if cfg.dataset == "amazon2014":
        f = files_2014(cfg)
        return [(f["reviews"], reviews_2014(f["reviews"])), (f["meta"], iter_records(f["meta"]))]
    if cfg.dataset == "amazon2018":
        f = files_2018(cfg)
        return [(f["reviews"], reviews_2018(f["reviews"])), (f["meta"], iter_records(f["meta"]))]
    f = files_2023(cfg)
    return [(f["reviews"], reviews_2023(f["reviews"])), (f["meta"], iter_records(f["meta"]))]
