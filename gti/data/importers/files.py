"""What every importer needs: the source folder, finding and opening its files, records with their line numbers, clean text."""

from __future__ import annotations

import ast
import gzip
import html
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gti.core.config import PrepareConfig
from gti.core.errors import ConfigError, DataError

TAG = re.compile(r"<[^>]+>")


SPACE = re.compile(r"\s+")


Records = Iterator[tuple[int, dict]]  # (line number, record)


# ----------------------------------------------------------------------------------------- files
def source_dir(cfg: PrepareConfig) -> Path:
    if not cfg.source:
        raise ConfigError(f"dataset={cfg.dataset} needs source=FOLDER (the folder with the downloaded files)")
    folder = Path(cfg.source)
    if not folder.is_dir():
        raise DataError(f"source={cfg.source}: not a folder")
    return folder


def find_file(folder: Path, *names: str) -> Path:
    """The first of `names` present in `folder` (each also accepted without `.gz`)."""
    candidates = []
    for name in names:
        candidates.append(name)
        if name.endswith(".gz"):
            candidates.append(name[: -len(".gz")])
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder / names[0]}: file not found" + (f" (nor {', '.join(names[1:])})" if names[1:] else ""))


def find_files(folder: Path, wanted: dict[str, tuple[str, ...]]) -> dict[str, Path]:
    """find_file for several roles at once; one error lists every missing file."""
    found, missing = {}, []
    for role, names in wanted.items():
        try:
            found[role] = find_file(folder, *names)
        except DataError as e:
            missing.append(str(e))
    if missing:
        raise DataError.listing(missing, "missing input files")
    return found


def open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace", newline="")


# ----------------------------------------------------------------------------------------- records
def parse_record(text: str, where: str) -> dict:
    """One line: a JSON object or (Amazon 2014 metadata) a Python dict literal. Never `eval`."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        try:
            rec = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataError(f"{where}: not a JSON object or Python literal ({type(e).__name__})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    return rec


def iter_records(path: Path) -> Records:
    """(line number, dict) for every non-empty line of a JSON-lines / Python-literal-lines file."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield lineno, parse_record(line, f"{path}: line {lineno}")


# ----------------------------------------------------------------------------------------- item text
def clean_text(value: Any) -> str:
    """HTML tags out, entities unescaped, whitespace collapsed; lists joined with spaces."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(p for p in (clean_text(v) for v in value) if p)
    return SPACE.sub(" ", html.unescape(TAG.sub(" ", str(value)))).strip()
