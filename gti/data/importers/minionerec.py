"""MiniOneRec's SFT / RL data folder (the output of its `convert_dataset.py`):

  SOURCE/train/<Cat>*.csv  SOURCE/valid/<Cat>*.csv  SOURCE/test/<Cat>*.csv
      pandas CSVs with a header; the columns read here are user_id, history_item_id (a Python
      list literal of item ids), item_id, and for titles item_title / history_item_title.
      Other columns (history_item_sid, item_sid, ...) are ignored.
  SOURCE/info/<Cat>*.txt   optional: one "sid<TAB>title<TAB>item_id" line per item
  SOURCE/<Cat>.item.json   optional: the LC-Rec item file the folder was converted from

Without `category=` each split folder must hold exactly one CSV (and info/ at most one .txt).

Each CSV row is a window (history, target) of one user's sequence; MiniOneRec keeps no
timestamps and caps the history (10 items in its Amazon scripts). Each user's sequence is rebuilt
by chaining the windows in split order (train, valid, test), then history length, then file
order: a window whose history continues the sequence adds its target; one that starts later
(rows sampled away) adds the items the sequence lacks. Rows get increasing timestamps in that
order. Item text: title + description from the .item.json when present, else the info file's
title, else the CSV titles. MiniOneRec's SIDs are not imported (`python -m gti.sids` builds ours).
"""

from __future__ import annotations

import ast
import csv
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from gti.core.config import PrepareConfig
from gti.core.errors import DataError
from gti.core.log import get_logger
from gti.data.importers import Raw
from gti.data.importers.files import clean_text, source_dir

log = get_logger("prepare")

SPLITS = ("train", "valid", "test")


# ----------------------------------------------------------------------------------------- files
def _pick(folder: Path, pattern: str, category: str | None, required: bool) -> Path | None:
    found = sorted(p for p in folder.glob(pattern) if not category or p.name.startswith(category))
    want = f"{folder}/{category or ''}*{pattern.lstrip('*')}"
    if len(found) > 1:
        raise DataError(f"{want}: {len(found)} files match ({', '.join(p.name for p in found)}); set category=")
    if not found and required:
        raise DataError(f"{want}: file not found")
    return found[0] if found else None


def minionerec_files(cfg: PrepareConfig) -> dict[str, Path]:
    src = source_dir(cfg)
    files = {s: p for s in SPLITS if (src / s).is_dir() and (p := _pick(src / s, "*.csv", cfg.category, False))}
    if not files:
        raise DataError(f"{src}/train/{cfg.category or ''}*.csv: file not found (expected train/, valid/, test/ CSVs)")
    if (src / "info").is_dir() and (info := _pick(src / "info", "*.txt", cfg.category, False)):
        files["info"] = info
    if item_json := _pick(src, "*.item.json", cfg.category, False):
        files["items"] = item_json
    return files


# ----------------------------------------------------------------------------------------- rows
def _literal_list(text: str, where: str) -> list:
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise DataError(f"{where}: not a Python list literal: {text[:60]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: expected a list, got {type(value).__name__}")
    return list(value)


def csv_rows(path: Path) -> Iterator[dict]:
    """{"line", "user", "history" [item ids], "target", "titles" {item id: title}} per row."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"user_id", "history_item_id", "item_id"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: line 1: missing columns {', '.join(sorted(missing))}")
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            history = [str(i) for i in _literal_list(row["history_item_id"], where)]
            target = str(row["item_id"]).strip()
            if not target:
                raise DataError(f"{where}: empty item_id")
            titles = {}
            if row.get("history_item_title"):
                hist_titles = _literal_list(row["history_item_title"], where)
                if len(hist_titles) == len(history):
                    titles.update(zip(history, map(str, hist_titles), strict=True))
            if row.get("item_title"):
                titles[target] = row["item_title"]
            yield {
                "line": reader.line_num,
                "user": row["user_id"],
                "history": history,
                "target": target,
                "titles": titles,
            }


def info_titles(path: Path) -> Iterator[tuple[str, str]]:
    """(item id, title) from "sid<TAB>title<TAB>item_id" lines."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise DataError(f"{path}: line {lineno}: expected sid<TAB>title<TAB>item_id")
            yield parts[-1].strip(), "\t".join(parts[1:-1])


def chain_windows(windows: list[tuple[list[str], str]]) -> list[str]:
    """One sequence from overlapping (history, target) windows, in order."""
    seq: list[str] = []
    for history, target in windows:
        # the longest head of `history` that already ends `seq`: all of it when the windows are
        # contiguous, less when rows in between are missing (then the rest of `history` is new)
        k = next((k for k in range(min(len(history), len(seq)), 0, -1) if seq[-k:] == history[:k]), 0)
        seq.extend(history[k:])
        seq.append(target)
    return seq


# ----------------------------------------------------------------------------------------- import
def read_minionerec(cfg: PrepareConfig) -> Raw:
    files = minionerec_files(cfg)
    windows: dict[str, list[tuple]] = defaultdict(list)
    titles: dict[str, str] = {}
    seen: set[tuple] = set()
    for rank, split in enumerate(SPLITS):
        if split not in files:
            continue
        for row in csv_rows(files[split]):
            key = (row["user"], tuple(row["history"]), row["target"])
            if key in seen:  # the same window twice adds nothing
                continue
            seen.add(key)
            windows[row["user"]].append(((rank, len(row["history"]), row["line"]), row["history"], row["target"]))
            for item, title in row["titles"].items():
                titles.setdefault(item, title)
    if "info" in files:
        titles.update(info_titles(files["info"]))
    items = {k: {"title": clean_text(t), "description": ""} for k, t in titles.items() if clean_text(t)}
    if "items" in files:
        items.update(_item_json(files["items"]))
    rows: list[tuple[str, str, float]] = []
    for user in windows:  # first-seen order; ids are renumbered deterministically later
        ordered = [(h, t) for _, h, t in sorted(windows[user], key=lambda w: w[0])]
        rows.extend((user, item, float(len(rows))) for item in chain_windows(ordered))
    used = {i for _, i, _ in rows}
    log.info(
        f"minionerec: {len(windows)} users rebuilt; {len(used - items.keys())} items without a title dropped"
    )
    return Raw(rows, {k: v for k, v in items.items() if k in used}, [str(p) for p in files.values()])


def _item_json(path: Path) -> dict[str, dict]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{item id: {{title, description}}}}")
    items = {}
    for key, meta in raw.items():
        if isinstance(meta, dict) and clean_text(meta.get("title")):
            items[str(key)] = {
                **meta,
                "title": clean_text(meta["title"]),
                "description": clean_text(meta.get("description")),
            }
    return items


def peek(cfg: PrepareConfig) -> list[tuple[Path, Iterator]]:
    files = minionerec_files(cfg)
    out = [(files[s], csv_rows(files[s])) for s in SPLITS if s in files]
    if "info" in files:
        out.append((files["info"], info_titles(files["info"])))
    return out
