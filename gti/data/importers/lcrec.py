"""A folder already in the native LC-Rec-family format (LC-Rec, LETTER, MiniOneRec's RQ inputs):

  SOURCE/STEM.inter.json  SOURCE/STEM.item.json  [SOURCE/STEM.index.json]  [SOURCE/STEM.emb-*.npy]

`python -m gti.prepare dataset=lcrec source=SOURCE` validates them with the `gti.data.dataset` readers,
reports SID collisions when an index is present, and copies them to ROOT/NAME/NAME.* in one atomic
rename: ids, order and filtering are kept exactly as they are (no k-core, no renumbering).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from gti.core.config import PrepareConfig
from gti.core.errors import DataError
from gti.core.io import atomic_dir, write_json
from gti.core.log import get_logger
from gti.data.dataset import dataset_dir, read_index, read_inter, read_items, validate
from gti.data.importers import Raw
from gti.data.importers.files import source_dir
from gti.data.sid_index import analyze_index

log = get_logger("prepare")

REPORTED = ("items", "unique_sids", "collisions", "max_bucket", "prefix_conflicts", "lengths", "code_base")


def lcrec_files(cfg: PrepareConfig) -> dict[str, Path]:
    """inter / item (required), index and emb-* (optional) of the one dataset in the folder."""
    src = source_dir(cfg)
    stems = sorted(p.name[: -len(".inter.json")] for p in src.glob("*.inter.json"))
    if cfg.category:
        stems = [s for s in stems if s == cfg.category]
    if len(stems) != 1:
        want = f"{src}/{cfg.category or 'NAME'}.inter.json"
        raise DataError(
            f"{want}: file not found"
            if not stems
            else f"{src}: several datasets ({', '.join(stems)}); set category=NAME"
        )
    stem = stems[0]
    files = {kind: src / f"{stem}.{kind}.json" for kind in ("inter", "item", "index")}
    if not files["item"].is_file():
        raise DataError(f"{files['item']}: file not found")
    if not files["index"].is_file():
        del files["index"]
    for emb in sorted(src.glob(f"{stem}.emb-*.npy")):
        files[emb.name[len(stem) + 1 : -len(".npy")]] = emb  # "emb-<encoder>"
    return files


def _check(files: dict[str, Path]) -> tuple[dict, dict, dict | None]:
    inter, items = read_inter(files["inter"]), read_items(files["item"])
    validate(inter, items, files["inter"])
    report = None
    if "index" in files:
        index = read_index(files["index"])
        missing, extra = sorted(set(items) - set(index)), sorted(set(index) - set(items))
        if missing or extra:
            what = f"item {missing[0]} has no SID" if missing else f"item {extra[0]} is not in {files['item'].name}"
            raise DataError(
                f"{files['index']}: {len(missing)} items without a SID, {len(extra)} unknown items; e.g. {what}"
            )
        report = analyze_index(index)
    return inter, items, report


def import_lcrec(cfg: PrepareConfig, name: str) -> Path:
    """Validate the native files and copy them to ROOT/NAME as they are."""
    files = lcrec_files(cfg)
    inter, items, sid_report = _check(files)
    stats = {"users": len(inter), "items": len(items), "interactions": sum(len(s) for s in inter.values())}
    out = dataset_dir(cfg.root, name)
    with atomic_dir(out) as tmp:
        for kind, path in files.items():
            suffix = ".npy" if kind.startswith("emb-") else ".json"
            shutil.copyfile(path, tmp / f"{name}.{kind}{suffix}")
        report = {"dataset": "lcrec", "kcore": None, "source": [str(p) for p in files.values()], **stats}
        if sid_report is not None:
            report["sids"] = {k: sid_report[k] for k in REPORTED}
        write_json(tmp / f"{name}.prepare_report.json", report)
    log.info(
        f"{name}: {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions (copied as-is) -> {out}"
    )
    if sid_report is not None:
        n, c = sid_report["collisions"], sid_report["prefix_conflicts"]
        log.info(
            f"{name}.index.json: {sid_report['unique_sids']} distinct SIDs for {sid_report['items']} items; {n} collisions, {c} prefix conflicts"
        )
        if n or c:
            log.info(
                f"repair: python -m gti.sids data.name={name} data.root={cfg.root} import_index={out / f'{name}.index.json'}"
            )
    return out


def read_lcrec(cfg: PrepareConfig) -> Raw:
    """The same files as interaction rows (position = timestamp), for callers that want a `Raw`."""
    files = lcrec_files(cfg)
    inter, items, _ = _check(files)
    rows = [(u, i, float(t)) for u in sorted(inter) for t, i in enumerate(inter[u])]
    return Raw(rows, items, [str(files["inter"]), str(files["item"])])


def peek(cfg: PrepareConfig) -> list[tuple[Path, Iterator]]:
    files = lcrec_files(cfg)
    out = [
        (files["inter"], iter(read_inter(files["inter"]).items())),
        (files["item"], iter(read_items(files["item"]).items())),
    ]
    if "index" in files:
        out.append((files["index"], iter(read_index(files["index"]).items())))
    return out
