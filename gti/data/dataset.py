"""Native dataset: the LC-Rec family of JSON files (docs/data.md).

DATA_ROOT/NAME/
  NAME.inter.json   {"<user idx>": [item idx, ...]}  chronological, 0-based ints
  NAME.item.json    {"<item idx>": {"title": str, "description": str, ...}}
  NAME.index.json   {"<item idx>": ["<a_183>", "<b_70>", ...]}   (Semantic IDs)
Every reader validates and raises `DataError` naming the file and key.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gti.core.errors import DataError
from gti.core.io import write_json

# a SID token is `<prefix_code>`: ours have one lower-case letter per level (<a_12>); foreign indexes use other
# prefixes and cases (<A_1>, <x_12>, <item_3>)
SID_TOKEN = re.compile(r"^<([A-Za-z]+)_(\d+)>$")


def parse_sid_token(token: str) -> tuple[str, int] | None:
    """'<a_12>' -> ('a', 12); None for anything that is not a SID token."""
    m = SID_TOKEN.match(token)
    return (m.group(1), int(m.group(2))) if m else None


# ----------------------------------------------------------------------------------------- paths
def dataset_dir(root: str | Path, name: str) -> Path:
    return Path(root) / name


def dataset_file(root: str | Path, name: str, kind: str) -> Path:
    """kind: inter | item | index | sids_report (.json); emb-<encoder> | sid_codevecs | codebooks (.npy)."""
    suffix = ".npy" if kind.startswith("emb-") or kind in ("sid_codevecs", "codebooks") else ".json"
    return dataset_dir(root, name) / f"{name}.{kind}{suffix}"


# ----------------------------------------------------------------------------------------- readers
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def _int_key(path: Path, key: str) -> int:
    try:
        value = int(key)
    except (TypeError, ValueError):
        raise DataError(f"{path}: key {key!r} is not an integer index") from None
    if value < 0:
        raise DataError(f"{path}: key {key!r} is negative")
    return value


def read_inter(path: str | Path) -> dict[int, list[int]]:
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{user: [items]}}, got {type(raw).__name__}")
    inter: dict[int, list[int]] = {}
    for key, seq in raw.items():
        user = _int_key(path, key)
        # set(map(type, ...)) runs in C: a 1M-interaction file is checked in milliseconds (bool is not int here)
        if not isinstance(seq, list) or set(map(type, seq)) - {int}:
            raise DataError(f"{path}: user {key!r}: expected a list of integer item ids")
        if min(seq, default=0) < 0:
            raise DataError(f"{path}: user {key!r}: negative item id")
        inter[user] = seq
    return inter


def read_items(path: str | Path) -> dict[int, dict]:
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{item: {{title, description}}}}")
    items: dict[int, dict] = {}
    for key, meta in raw.items():
        item = _int_key(path, key)
        if not isinstance(meta, dict):
            raise DataError(f"{path}: item {key!r}: expected an object with 'title'")
        title = meta.get("title")
        if not isinstance(title, str):
            raise DataError(f"{path}: item {key!r}: missing 'title' (string)")
        if not title.strip() and not str(meta.get("description", "")).strip():
            raise DataError(f"{path}: item {key!r}: empty text (title and description are both empty)")
        items[item] = meta
    return items


def read_index(path: str | Path) -> dict[int, list[str]]:
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected an object {{item: [sid tokens]}}")
    index: dict[int, list[str]] = {}
    for key, toks in raw.items():
        item = _int_key(path, key)
        if not isinstance(toks, list) or not toks or not all(isinstance(t, str) and t for t in toks):
            raise DataError(f"{path}: item {key!r}: expected a non-empty list of token strings")
        index[item] = toks
    return index


# ----------------------------------------------------------------------------------------- dataset
@dataclass
class Dataset:
    name: str
    root: Path
    inter: dict[int, list[int]]
    items: dict[int, dict]
    index: dict[int, list[str]] | None = None

    @property
    def num_items(self) -> int:
        return len(self.items)

    def path(self, kind: str) -> Path:
        return dataset_file(self.root, self.name, kind)


def load_dataset(root: str | Path, name: str, need_index: bool = False) -> Dataset:
    root = Path(root)
    inter = read_inter(dataset_file(root, name, "inter"))
    items = read_items(dataset_file(root, name, "item"))
    validate(inter, items, dataset_file(root, name, "inter"))
    index = None
    index_path = dataset_file(root, name, "index")
    if index_path.is_file():
        index = read_index(index_path)
        missing = sorted(set(items) - set(index))
        if missing:
            raise DataError(f"{index_path}: {len(missing)} items have no SID, e.g. item {missing[0]}")
    elif need_index:
        raise DataError(f"{index_path}: no SID index; build it with `python -m gti.sids data.name={name}`")
    return Dataset(name, root, inter, items, index)


def validate(inter: dict[int, list[int]], items: dict[int, dict], where: str | Path = "inter.json") -> None:
    if not inter:
        raise DataError(f"{where}: no users")
    expected = list(range(len(items)))
    if sorted(items) != expected:
        gap = next(i for i, j in zip(expected + [len(items)], sorted(items) + [-1]) if i != j)
        raise DataError(f"item.json: item ids must be 0..{len(items) - 1}; item {gap} is missing")
    for user, seq in inter.items():
        if not items.keys() >= set(seq):
            bad = next(i for i in seq if i not in items)
            raise DataError(f"{where}: user {user}: item {bad} is not in item.json")


def write_dataset(root: str | Path, name: str, inter: dict[int, list[int]], items: dict[int, dict]) -> Path:
    validate(inter, items)
    write_json(dataset_file(root, name, "item"), {str(k): items[k] for k in sorted(items)})
    # inter last: its presence marks a complete dataset
    write_json(dataset_file(root, name, "inter"), {str(k): inter[k] for k in sorted(inter)}, indent=None)
    return dataset_dir(root, name)


def item_text(meta: dict, fields: Iterable[str] = ("title", "description")) -> str:
    """One string for encoders: 'Title. Description' (fields that are empty are skipped)."""
    parts = [str(meta.get(f, "")).strip() for f in fields]
    return ". ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Example:
    index: int  # global example index (keys metrics under DDP)
    user: int
    history: tuple[int, ...]
    target: int


def leave_one_out(inter: dict[int, list[int]], max_history: int = 20, train: bool = True) -> dict[str, list[Example]]:
    """train = every prefix of seq[:-2]; valid target = seq[-2]; test target = seq[-1].
    train=False leaves the train split empty (stages build training rows with gti.train.rows.train_table)."""
    splits: dict[str, list[Example]] = {"train": [], "valid": [], "test": []}

    def add(split: str, user: int, history: list[int], target: int) -> None:
        hist = tuple(history[-max_history:]) if max_history > 0 else tuple(history)
        splits[split].append(Example(len(splits[split]), user, hist, target))

    for user in sorted(inter):
        seq = inter[user]
        if len(seq) < 3:
            continue  # too short for leave-one-out
        for t in range(1, len(seq) - 2) if train else ():
            add("train", user, seq[:t], seq[t])
        add("valid", user, seq[:-2], seq[-2])
        add("test", user, seq[:-1], seq[-1])
    return splits


# ----------------------------------------------------------------------------------------- preprocessing
def natural_key(x: Hashable) -> tuple:
    s = str(x)
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


def build_sequences(
    interactions: list[tuple[Hashable, Hashable, float]],
    item_meta: dict[Hashable, dict],
    kcore: int = 5,
) -> tuple[dict[int, list[int]], dict[int, dict], dict[str, int]]:
    """(user key, item key, timestamp) rows -> native inter/items with deterministic ids.

    Standard preprocessing (docs/data.md): drop items without metadata, remove repeated
    user-item pairs (keep the earliest), iterative k-core on users and items, sort each user's
    items by timestamp with the original row order as a stable tie-break, then number users and
    items by their sorted original keys (never by set iteration order).
    """
    stats = {"rows_in": len(interactions)}
    rows = [(u, i, float(t), n) for n, (u, i, t) in enumerate(interactions) if i in item_meta]
    stats["rows_with_meta"] = len(rows)
    rows.sort(key=lambda r: (r[2], r[3]))
    seen: set[tuple] = set()
    dedup = []
    for r in rows:
        if (r[0], r[1]) not in seen:
            seen.add((r[0], r[1]))
            dedup.append(r)
    stats["rows_dedup"] = len(dedup)
    while kcore > 1:
        ucount = Counter(r[0] for r in dedup)
        icount = Counter(r[1] for r in dedup)
        kept = [r for r in dedup if ucount[r[0]] >= kcore and icount[r[1]] >= kcore]
        if len(kept) == len(dedup):
            break
        dedup = kept
    if not dedup:
        raise DataError(f"no interactions left after {kcore}-core filtering")
    users = sorted({r[0] for r in dedup}, key=natural_key)
    items = sorted({r[1] for r in dedup}, key=natural_key)
    uid = {u: n for n, u in enumerate(users)}
    iid = {i: n for n, i in enumerate(items)}
    seqs: dict[int, list[int]] = defaultdict(list)
    for u, i, _, _ in dedup:  # already in (timestamp, row) order
        seqs[uid[u]].append(iid[i])
    out_items = {iid[i]: item_meta[i] for i in items}
    stats.update(users=len(users), items=len(items), interactions=len(dedup))
    return dict(seqs), out_items, stats
