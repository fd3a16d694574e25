"""P5's preprocessed Amazon / Yelp splits: `sequential_data.txt` + `datamaps.json` in one folder.

  sequential_data.txt  one user per line: "user item item ...", 1-based ids, chronological
  datamaps.json        {"user2id", "item2id", "id2item", ...}: P5 id <-> original id (asin)

P5 keeps no timestamps: rows get increasing timestamps in file order, so each user's order is the
line's order. Item text: with `category=Beauty` the folder must also hold the Amazon 2014
`meta_Beauty.json.gz` (read as in `gti.data.importers.amazon`); items it gives no title keep their asin
as the title (counted). Without a category every title is the asin and descriptions are empty,
which is enough to run the pipeline but gives the text-based SIDs and grounding nothing to use.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from gti.core.config import PrepareConfig
from gti.core.errors import DataError
from gti.core.log import get_logger
from gti.data.importers import Raw
from gti.data.importers.amazon import item_2014, read_meta
from gti.data.importers.files import find_files, iter_records, source_dir

log = get_logger("prepare")


def p5_files(cfg: PrepareConfig) -> dict[str, Path]:
    wanted = {"sequences": ("sequential_data.txt",), "datamaps": ("datamaps.json",)}
    if cfg.category:
        wanted["meta"] = (f"meta_{cfg.category}.json.gz",)
    return find_files(source_dir(cfg), wanted)


def sequence_rows(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, user id, [item ids]) per non-empty line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cells = line.split()
            if not cells:
                continue
            if len(cells) < 2 or not all(c.isdigit() for c in cells):
                raise DataError(f"{path}: line {lineno}: expected 'user item item ...' with integer ids")
            yield lineno, cells[0], cells[1:]


def read_id2item(path: Path) -> dict[str, str]:
    try:
        maps = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(maps, dict) and isinstance(maps.get("id2item"), dict):
        return {str(k): str(v) for k, v in maps["id2item"].items()}
    if isinstance(maps, dict) and isinstance(maps.get("item2id"), dict):
        return {str(v): str(k) for k, v in maps["item2id"].items()}
    raise DataError(f"{path}: expected an object with 'id2item' (or 'item2id')")


def read_p5(cfg: PrepareConfig) -> Raw:
    files = p5_files(cfg)
    id2item = read_id2item(files["datamaps"])
    rows: list[tuple[str, str, float]] = []
    for lineno, user, seq in sequence_rows(files["sequences"]):
        unknown = [i for i in seq if i not in id2item]
        if unknown:
            raise DataError(
                f"{files['sequences']}: line {lineno}: item {unknown[0]} is not in {files['datamaps'].name}"
            )
        rows.extend((user, item, float(len(rows))) for item in seq)  # synthetic, increasing in file order
    used = sorted({i for _, i, _ in rows}, key=int)
    meta = {}
    if "meta" in files:
        meta = read_meta(files["meta"], "asin", item_2014, {id2item[i] for i in used})
    items = {i: meta.get(id2item[i]) or {"title": id2item[i], "description": ""} for i in used}
    if "meta" in files:
        log.info(f"p5: {sum(id2item[i] not in meta for i in used)} items keep their asin as title")
    return Raw(rows, items, [str(p) for p in files.values()])


def peek(cfg: PrepareConfig) -> list[tuple[Path, Iterator]]:
    files = p5_files(cfg)
    out = [
        (files["sequences"], sequence_rows(files["sequences"])),
        (files["datamaps"], iter([read_id2item(files["datamaps"])])),
    ]
    if "meta" in files:
        out.append((files["meta"], iter_records(files["meta"])))
    return out
