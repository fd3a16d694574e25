"""Build or import the SID index of a dataset: embed item text (gti.indexing.embed), quantise, make SIDs
collision-free, report."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from gti.core.config import SidsConfig
from gti.core.errors import ConfigError, DataError
from gti.core.io import file_sha256, save_npy, text_sha256, write_json
from gti.core.log import get_logger
from gti.core.runs import versions
from gti.data.convert import ensure_prepared
from gti.data.dataset import dataset_dir, dataset_file, item_text, read_index, read_items
from gti.data.sid_index import analyze_index, check_index
from gti.indexing.embed import embeddings, encoder_tag
from gti.indexing.guard import use_existing
from gti.indexing.quantize import (
    LETTERS,
    dedup_level,
    reconstruct,
    repair_index,
    rq_kmeans,
    to_tokens,
    usage_report,
)

SCHEMA_VERSION = 1
QUANTIZERS = ("rqkmeans", "rqvae")
log = get_logger("sids")


# ----------------------------------------------------------------------------------------- paths
def codevecs_path(root: str | Path, name: str) -> Path:
    return dataset_file(root, name, "sid_codevecs")


def codebooks_path(root: str | Path, name: str) -> Path:
    return dataset_file(root, name, "codebooks")


def _read_report(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a broken report only means "rebuild"


@contextlib.contextmanager
def _timed(phases: dict, name: str):
    t0 = time.perf_counter()
    yield
    phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - t0, 3)


# ----------------------------------------------------------------------------------------- inputs
def check_config(cfg: SidsConfig) -> None:
    problems = []
    if cfg.quantizer not in QUANTIZERS:
        problems.append(f"quantizer={cfg.quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
    if cfg.levels < 1 or cfg.levels + 1 > len(LETTERS):
        problems.append(f"levels={cfg.levels}: must be 1..{len(LETTERS) - 1} (one letter per level + dedup)")
    if cfg.codes < 2:
        problems.append(f"codes={cfg.codes}: must be >= 2")
    for key in ("kmeans_iters", "embed_batch_size", "embed_max_length", "rqvae_code_dim", "rqvae_hidden", "rqvae_epochs", "rqvae_batch_size"):
        if getattr(cfg, key) < 1:
            problems.append(f"{key}={getattr(cfg, key)}: must be >= 1")
    if cfg.import_index and not Path(cfg.import_index).is_file():
        problems.append(f"import_index={cfg.import_index}: file not found")
    if problems:
        raise ConfigError.listing(problems)


def load_items(cfg: SidsConfig) -> dict[int, dict]:
    """item.json of data.name; MovieLens is prepared on demand."""
    root, name = cfg.data.root, cfg.data.name
    ensure_prepared(name, root)
    path = dataset_file(root, name, "item")
    items = read_items(path)
    if sorted(items) != list(range(len(items))):
        raise DataError(f"{path}: item ids must be 0..{len(items) - 1}")
    return items


def quantizer_settings(cfg: SidsConfig) -> dict:
    """Everything that changes the SIDs besides the texts (hashed and recorded in the report; an index
    built with other settings is replaced only with force=true)."""
    s = {"schema_version": SCHEMA_VERSION, "encoder": encoder_tag(cfg), "quantizer": cfg.quantizer,
         "levels": cfg.levels, "codes": cfg.codes, "seed": cfg.seed, "kmeans_iters": cfg.kmeans_iters,
         "kmeans_balanced": cfg.kmeans_balanced}  # fmt: skip
    if cfg.encoder == "backbone":
        s["embed_max_length"] = cfg.embed_max_length
    if cfg.quantizer == "rqvae":
        s.update({k: v for k, v in vars(cfg).items() if k.startswith("rqvae_") and k != "rqvae_accelerator"})
    return s


def texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\x1e")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- build
def quantize(X: np.ndarray, cfg: SidsConfig) -> tuple[np.ndarray, list[np.ndarray], list[dict]]:
    if cfg.quantizer == "rqvae":
        from gti.indexing.rqvae import rq_vae

        return rq_vae(
            X, cfg.levels, cfg.codes, code_dim=cfg.rqvae_code_dim, hidden=cfg.rqvae_hidden, epochs=cfg.rqvae_epochs,
            lr=cfg.rqvae_lr, batch_size=cfg.rqvae_batch_size, beta=cfg.rqvae_beta, balance=cfg.rqvae_balance,
            seed=cfg.seed, kmeans_iters=cfg.kmeans_iters, accelerator=cfg.rqvae_accelerator,
        )  # fmt: skip
    codes, books = rq_kmeans(X, cfg.levels, cfg.codes, cfg.kmeans_iters, cfg.seed, cfg.kmeans_balanced)
    return codes, books, []


def run(cfg: SidsConfig, stage: bool = False) -> dict:
    """Build data/NAME's SIDs, or skip when the index on disk matches. stage=True (ensure_dataset):
    an existing index is never rebuilt (unless force), and config keys are named `sids.<key>`."""
    check_config(cfg)
    if cfg.import_index:
        return import_index(cfg)
    root, name = cfg.data.root, cfg.data.name
    phases: dict[str, float] = {}
    t_start = time.perf_counter()
    with _timed(phases, "load"):
        items = load_items(cfg)
        texts = [item_text(items[i]) for i in range(len(items))]
        t_hash = texts_hash(texts)
        settings = quantizer_settings(cfg)
        input_hash = text_sha256(json.dumps({"texts": t_hash, **settings}, sort_keys=True))
    report_path, index_path = dataset_file(root, name, "sids_report"), dataset_file(root, name, "index")
    old = _read_report(report_path)
    if not cfg.force and index_path.is_file() and use_existing(cfg, old, settings, input_hash, stage):
        return {**(old or {}), "skipped": True}

    log.info(
        f"{name}: {len(texts)} items, encoder {cfg.encoder}"
        f"{' (' + cfg.model + ')' if cfg.encoder == 'backbone' else ''} -> {cfg.quantizer} "
        f"{cfg.levels} levels x {cfg.codes} codes + dedup level, seed {cfg.seed}"
    )
    emb_key = text_sha256(json.dumps({"texts": t_hash, "encoder": settings["encoder"], "max_length": settings.get("embed_max_length")}))
    with _timed(phases, "embed"):
        X, cached = embeddings(cfg, texts, emb_key, old)
    with _timed(phases, "quantize"):
        codes, books, history = quantize(X, cfg)
    with _timed(phases, "dedup"):
        full, stats = dedup_level(codes)
        tokens = to_tokens(full)
        codevecs = reconstruct(codes, books).astype(np.float32)
    emb_path = dataset_file(root, name, f"emb-{encoder_tag(cfg)}")
    report = {
        "schema_version": SCHEMA_VERSION,
        "dataset": name,
        "items": len(texts),
        "encoder": cfg.encoder,
        "model": cfg.model if cfg.encoder == "backbone" else None,
        "embedding": {"file": emb_path.name, "dim": int(X.shape[1]), "cached": cached, "key": emb_key, "sha256": file_sha256(emb_path)},
        "quantizer": cfg.quantizer,
        "levels": cfg.levels,
        "codes": cfg.codes,
        "seed": cfg.seed,
        "settings": settings,
        "sid_length": cfg.levels + 1,
        "dedup_letter": LETTERS[cfg.levels],
        "dedup_codes": stats["max_bucket"],
        "collisions_before_dedup": stats["collisions_before"],
        "colliding_items": stats["colliding_items"],
        "colliding_prefixes": stats["colliding_prefixes"],
        "max_bucket": stats["max_bucket"],
        "largest_bucket": {"sid": "".join(tokens[stats["largest_bucket"][0]][:-1]), "items": stats["largest_bucket"]},
        "collisions_after_dedup": int(len(full) - len(np.unique(full, axis=0))),
        "usage": usage_report(full, [cfg.codes] * cfg.levels + [None]),
        "quantization": _quantization_error(X, codevecs) if cfg.quantizer == "rqkmeans" else {"final": history[-1] if history else None},
        "loss_history": history,
        "files": {"index": index_path.name, "codevecs": codevecs_path(root, name).name, "codebooks": codebooks_path(root, name).name},
        "input_hash": input_hash,
        "versions": versions(("numpy", "torch")),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with _timed(phases, "write"):
        save_npy(codevecs_path(root, name), codevecs)
        save_npy(codebooks_path(root, name), np.stack(books).astype(np.float32))
        write_json(index_path, {str(i): tokens[i] for i in range(len(tokens))}, indent=None)
        report["outputs_sha256"] = {k: file_sha256(dataset_dir(root, name) / f) for k, f in report["files"].items()}
    phases["total"] = round(time.perf_counter() - t_start, 3)
    report["wall_time_s"] = phases
    write_json(report_path, report)  # last: a report with a hash marks a complete build
    _log_summary(report, index_path)
    return {**report, "skipped": False}


def _quantization_error(X: np.ndarray, recon: np.ndarray) -> dict:
    """Relative squared error of the quantised reconstruction, ||x - x_q||² / ||x||², averaged."""
    err = ((X - recon) ** 2).sum(1) / np.maximum((X**2).sum(1), 1e-12)
    return {"relative_sq_error": round(float(err.mean()), 5)}


def _log_summary(report: dict, index_path: Path) -> None:
    lines = [
        f"wrote {index_path}: {report['items']} items, collisions before dedup "
        f"{report['collisions_before_dedup']} ({report['colliding_items']} items in {report['colliding_prefixes']} "
        f"shared prefixes, largest bucket {report['max_bucket']}), after dedup {report['collisions_after_dedup']}"
    ]
    lines += [
        f"  level {u['letter']}: {u['used']}/{u['codes']} codes used, entropy {u['entropy_bits']:.2f}"
        f"/{u['max_entropy_bits']:.2f} bits, largest code holds {u['max_bucket']} items"
        for u in report["usage"]
    ]
    lines.append(f"  wall time (s): {report['wall_time_s']}")
    log.info("\n".join(lines))


# ----------------------------------------------------------------------------------------- import
def import_index(cfg: SidsConfig) -> dict:
    """Validate a foreign index.json against item.json, report collisions, optionally repair, write."""
    root, name = cfg.data.root, cfg.data.name
    src = Path(cfg.import_index)
    items = load_items(cfg)
    index = read_index(src)
    check_index(index, str(src), len(items), str(dataset_file(root, name, "item")))
    new, report = repair_index(index) if cfg.repair else (index, {**analyze_index(index), "repaired": False})
    if not cfg.repair and (report["collisions"] or report["prefix_conflicts"]):
        shown = "; ".join(f"{e['sid']} -> items {', '.join(map(str, e['items'][:5]))}" for e in report["examples"][:3])
        raise DataError(
            f"{src}: {report['collisions']} items share a SID with an earlier item (largest bucket "
            f"{report['max_bucket']}; {report['prefix_conflicts']} SIDs are a prefix of another): {shown}; "
            f"run with repair=true to append a dedup level"
        )
    dest = dataset_file(root, name, "index")
    write_json(dest, {str(i): new[i] for i in sorted(new)}, indent=None)
    # codebooks / code vectors of an earlier build do not describe these SIDs
    for stale in (codevecs_path(root, name), codebooks_path(root, name)):
        if stale.is_file():
            stale.unlink()
            log.info(f"removed {stale} (it belonged to the previous SIDs)")
    out = {
        "schema_version": SCHEMA_VERSION,
        "dataset": name,
        "quantizer": "imported",
        "source": str(src),
        "source_sha256": file_sha256(src),
        **report,
        "files": {"index": dest.name},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(dataset_file(root, name, "sids_report"), out)
    ex = f"; e.g. {report['examples'][0]['sid']} -> items {report['examples'][0]['items'][:5]}" if report["examples"] else ""
    log.info(
        f"imported {src}: {report['items']} items, {report['unique_sids']} distinct SIDs, "
        f"{report['collisions']} collisions (largest bucket {report['max_bucket']}){ex}, "
        f"{report['prefix_conflicts']} prefix conflicts"
    )
    if report["repaired"]:
        log.info(f"repaired: appended dedup level <{report['dedup_prefix']}_*> ({report['dedup_codes']} codes)")
    log.info(f"wrote {dest}")
    return {**out, "skipped": False}
