"""May an SID index on disk be used, rebuilt, or must the run stop? (docs/traps.md: never rebuild
silently what a finished run depends on; grounded runs record the index hash, gti.finetune checks it.)

`gti.indexing.build.run` asks `use_existing` before it builds over an existing NAME.index.json:
  index on disk                    a stage (ensure_dataset)       python -m gti.sids
  no report (hand-placed)          used as is                     built over
  imported                         used as is                     skipped
  other quantiser settings         ConfigError: each setting, on disk vs requested, and the ways out
  same inputs, all outputs intact  used as is                     skipped
  same inputs, index intact        used as is                     rebuilt (codevecs/codebooks changed)
  item texts changed, or the
  index is not the report's        ConfigError                    rebuilt (the old index no longer fits)
force=true (sids.force in a stage) rebuilds without asking.
"""

from __future__ import annotations

import dataclasses
import shlex

from gti.core.config import SidsConfig
from gti.core.errors import ConfigError
from gti.core.io import file_sha256
from gti.core.log import get_logger
from gti.data.dataset import dataset_dir, dataset_file

log = get_logger("sids")


def use_existing(cfg: SidsConfig, old: dict | None, settings: dict, input_hash: str, stage: bool) -> bool:
    """An index is on disk: True uses it, False rebuilds it (gti.sids only); replacing an index that
    runs may depend on is a ConfigError instead (docs/traps.md)."""
    root, name = cfg.data.root, cfg.data.name
    index_path, report_path = dataset_file(root, name, "index"), dataset_file(root, name, "sids_report")
    if old is None:
        if stage:
            log.info(f"{index_path} has no build report ({report_path.name}); used as is, settings unchecked")
            return True
        log.info(f"{index_path} has no build report ({report_path.name}): building ours over it")
        return False
    if old.get("quantizer") == "imported":
        log.info(f"{index_path} was imported from {old.get('source')}; skipped (force=true rebuilds it)")
        return True
    diff = settings_diff(old.get("settings") or {}, settings)
    if diff:
        raise ConfigError(_mismatch_message(cfg, old, diff, stage))
    if old.get("input_hash") == input_hash and _outputs_intact(cfg, old):
        log.info(f"{index_path} is up to date (same input hash {input_hash[:12]}); skipped (force=true rebuilds)")
        return True
    texts_changed = old.get("input_hash") != input_hash
    if not stage:  # the user asked for this build; the old index no longer describes item.json / its report
        log.info(f"{'item texts changed' if texts_changed else 'outputs differ from the report'}: rebuilding {index_path}")
        return False
    if not texts_changed and file_sha256(index_path) == old.get("outputs_sha256", {}).get("index"):
        log.info(f"{index_path} matches its report (other outputs differ: diagnostics may be off); used as is")
        return True
    why = "the item texts changed since it was built" if texts_changed else f"it is not the index {report_path.name} describes"
    raise ConfigError(
        f"{index_path}: {why}; a stage never replaces an SID index (runs grounded on it record its hash).\n"
        f"Rebuild it explicitly (runs grounded on the old index will then refuse to fine-tune):\n  {rebuild_command(cfg, set())}"
    )


def settings_diff(recorded: dict, requested: dict) -> dict[str, tuple]:
    """{setting: (recorded, requested)} for every SID setting that differs; absent on one side: None."""
    keys = [*requested, *(k for k in recorded if k not in requested)]
    return {k: (recorded.get(k), requested.get(k)) for k in keys if recorded.get(k) != requested.get(k)}


def _show(v) -> str:
    return "unset" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def rebuild_command(cfg: SidsConfig, keys: set[str]) -> str:
    """`python -m gti.sids ... force=true` that builds exactly cfg's SIDs (non-default settings + `keys`)."""
    default = SidsConfig()
    if "encoder" in keys and cfg.encoder == "backbone":
        keys = keys | {"model"}
    args = [f"data.name={cfg.data.name}", f"data.root={cfg.data.root}"]
    for f in dataclasses.fields(SidsConfig):
        value = getattr(cfg, f.name)
        if f.name not in ("data", "import_index", "repair", "force") and (f.name in keys or value != getattr(default, f.name)):
            args.append(f"{f.name}={_show(value)}")
    return shlex.join(["python", "-m", "gti.sids", *args, "force=true"])


def _mismatch_message(cfg: SidsConfig, old: dict, diff: dict[str, tuple], stage: bool) -> str:
    """Each differing setting (on disk vs requested) and the three ways out."""
    prefix = "sids." if stage else ""
    root, name = cfg.data.root, cfg.data.name
    report_path = dataset_file(root, name, "sids_report")
    fields = {f.name for f in dataclasses.fields(SidsConfig)}
    lines = [
        f"  - {k}: {_show(disk)} on disk ({report_path}) vs {_show(asked)} requested "
        f"({prefix + k if k in fields else 'this gti version'})"
        for k, (disk, asked) in diff.items()
    ]
    keep = []
    for k, (disk, _) in diff.items():
        if k == "encoder":
            keep += [f"{prefix}encoder={old.get('encoder')}"] + ([f"{prefix}model={old['model']}"] if old.get("model") else [])
        elif k in fields and disk is not None:
            keep.append(f"{prefix}{k}={_show(disk)}")
    ways = [f"use the index on disk: set {' '.join(keep)}"] if keep else []
    ways += [
        f"rebuild it (runs grounded on the old index will then refuse to fine-tune): {rebuild_command(cfg, set(diff))}",
        f"keep both: give this run its own data.root (with {name}.inter.json and {name}.item.json, or empty for "
        f"ml-100k / ml-1m, prepared on demand); the SIDs are built there on first use",
    ]
    return (
        f"{dataset_file(root, name, 'index')} was built with other SID settings than requested, and an SID index "
        f"is never replaced silently (runs grounded on it record its hash):\n" + "\n".join(lines)
        + "\nEither\n" + "\n".join(f"  - {w}" for w in ways)
    )


def _outputs_intact(cfg: SidsConfig, old: dict) -> bool:
    """The outputs named in the report exist and are the ones it describes (nobody swapped them)."""
    folder = dataset_dir(cfg.data.root, cfg.data.name)
    for key, fname in old.get("files", {}).items():
        path = folder / fname
        if not path.is_file() or file_sha256(path) != old.get("outputs_sha256", {}).get(key):
            return False
    emb = folder / old.get("embedding", {}).get("file", "")
    return not emb.is_file() or file_sha256(emb) == old["embedding"].get("sha256")
