"""One published setting end to end, as the four stage commands a user could type."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from gti.core.config import FinetuneConfig, GroundConfig, PrepareConfig, SidsConfig, eval_problems, load_config
from gti.core.errors import ConfigError, GtiError
from gti.data.convert import IMPORTERS, output_name
from gti.data.importers import amazon, lcrec, minionerec, p5

ARMS = ("gti", "mean", "multitask")
PEEKS = {  # dataset -> (file, record iterator) pairs for the dry-run check
    "amazon2014": amazon.peek,
    "amazon2018": amazon.peek,
    "amazon2023": amazon.peek,
    "p5": p5.peek,
    "minionerec": minionerec.peek,
    "lcrec": lcrec.peek,
}
PEEK_RECORDS = 3


@dataclass
class SidsOverrides:
    levels: int = 4
    codes: int = 256
    imported: bool = False  # prepare.dataset=lcrec: keep the folder's own index.json (gti.sids import_index=...)


@dataclass
class GroundOverrides:
    lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 10
    templates: list[str] = field(
        default_factory=lambda: ["title2sid", "desc2sid", "both2sid", "sid2title", "sid2desc", "sid2both"]
    )


@dataclass
class FinetuneOverrides:
    max_history: int = 20
    num_beams: int = 20
    ks: list[int] = field(default_factory=lambda: [5, 10])


@dataclass
class ProtocolConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    source: str | None = None  # folder with the downloaded files (shortcut for prepare.source)
    sids: SidsOverrides = field(default_factory=SidsOverrides)
    ground: GroundOverrides = field(default_factory=GroundOverrides)
    finetune: FinetuneOverrides = field(default_factory=FinetuneOverrides)
    model: str = "smollm2-135m"
    arms: list[str] = field(default_factory=lambda: ["gti", "mean"])  # gti | mean | multitask
    ground_config: str = "configs/ground-full.yaml"  # stage configs the overrides apply to
    finetune_config: str = "configs/finetune-full.yaml"
    output_dir: str | None = None  # None -> runs/<dataset name>
    dry_run: bool = True


# ----------------------------------------------------------------------------------------- commands
def _value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def _args(pairs: dict[str, Any]) -> list[str]:
    return [f"{k}={_value(v)}" for k, v in pairs.items()]


def commands(cfg: ProtocolConfig) -> list[tuple[str, list[str]]]:
    """(module, argv) per stage, in the order they run."""
    p = cfg.prepare
    name = output_name(p)
    out = Path(cfg.output_dir or f"runs/{name}")
    prep = {
        "dataset": p.dataset,
        "source": p.source,
        "category": p.category,
        "name": name,
        "root": p.root,
        "kcore": p.kcore if p.dataset != "lcrec" else None,
    }
    prep = {k: v for k, v in prep.items() if v is not None}
    if p.overwrite:
        prep["overwrite"] = True
    data = {"data.name": name, "data.root": p.root}
    sids = {"sids.levels": cfg.sids.levels, "sids.codes": cfg.sids.codes}
    evaluation = {
        "data.max_history": cfg.finetune.max_history,
        "eval.num_beams": cfg.finetune.num_beams,
        "eval.ks": cfg.finetune.ks,
    }
    steps = [
        ("gti.prepare", _args(prep)),
        ("gti.sids", _args({**data, "levels": cfg.sids.levels, "codes": cfg.sids.codes})),
    ]
    if cfg.sids.imported:  # validated, collisions reported and repaired by gti.sids
        steps[1] = ("gti.sids", _args({**data, "import_index": Path(p.root) / name / f"{name}.index.json"}))
    if "gti" in cfg.arms:
        ground = {
            "model": cfg.model,
            **data,
            **sids,
            "ground.templates": cfg.ground.templates,
            "optim.lr": cfg.ground.lr,
            "optim.batch_size": cfg.ground.batch_size,
            "trainer.max_epochs": cfg.ground.epochs,
            "trainer.max_steps": -1,
            "output_dir": out / "ground",
        }
        steps.append(("gti.ground", [cfg.ground_config, *_args(ground)]))
    for arm in cfg.arms:
        start = (
            {"init_from": out / "ground"} if arm == "gti" else {"init_from": None, "model": cfg.model, "init": "mean"}
        )
        if arm == "multitask":
            start["multitask"] = True
        finetune = {**start, **data, **sids, **evaluation, "output_dir": out / f"finetune-{arm}"}
        steps.append(("gti.finetune", [cfg.finetune_config, *_args(finetune)]))
    return steps


def shell(module: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])  # quoted so that it pastes into a shell


# ----------------------------------------------------------------------------------------- checks
SCHEMAS = {
    "gti.prepare": PrepareConfig,
    "gti.sids": SidsConfig,
    "gti.ground": GroundConfig,
    "gti.finetune": FinetuneConfig,
}


def sid_problems(steps: list[tuple[str, list[str]]]) -> list[str]:
    """The stages' `sids` sections (from ground_config / finetune_config) must describe the index the
    gti.sids step builds: a stage stops at an index built with other settings (see gti.sids)."""
    from gti.indexing.build import quantizer_settings
    from gti.indexing.guard import settings_diff

    problems = []
    try:
        built = quantizer_settings(load_config(SidsConfig, dict(steps)["gti.sids"]))
    except ConfigError:
        return []  # reported with the stage's arguments
    for module, argv in steps:
        if module in ("gti.ground", "gti.finetune"):
            try:
                diff = settings_diff(built, quantizer_settings(load_config(SCHEMAS[module], argv).sids))
            except ConfigError:
                continue
            problems += [f"{module} ({argv[0]}): sids.{k}={b}, but the gti.sids step builds {k}={a}; "
                         f"set the same sids values in both stage configs" for k, (a, b) in diff.items()]  # fmt: skip
    return problems


def check(cfg: ProtocolConfig, steps: list[tuple[str, list[str]]]) -> tuple[list[str], list[str]]:
    """(report lines, problems): every problem found, not just the first (style.md §4)."""
    lines, problems = [], []
    bad_arms = [a for a in cfg.arms if a not in ARMS]
    if bad_arms or not cfg.arms:
        problems.append(f"arms: {bad_arms or 'empty'}; choose from {', '.join(ARMS)}")
    for module, argv in steps:  # each stage parses its own arguments exactly as it will at run time
        try:
            stage = load_config(SCHEMAS[module], argv)
        except ConfigError as e:
            problems.append(f"{module}: {e}")
            continue
        if module == "gti.finetune":
            problems += [f"{module}: {p}" for p in eval_problems(stage.eval)]
    p = cfg.prepare
    if cfg.sids.imported and p.dataset != "lcrec":
        problems.append(
            f"sids.imported=true needs prepare.dataset=lcrec (a folder with its own index.json), not {p.dataset}"
        )
    if cfg.sids.imported and p.dataset == "lcrec":
        try:
            if "index" not in lcrec.lcrec_files(p):
                problems.append(f"sids.imported=true: no NAME.index.json in {p.source}")
        except GtiError:
            pass  # the file check below reports it
    if p.dataset not in IMPORTERS:
        problems.append(f"prepare.dataset={p.dataset}: unknown; choose one of {', '.join(sorted(IMPORTERS))}")
    elif p.dataset not in PEEKS:
        lines.append(f"dataset={p.dataset}: files are checked by gti.prepare itself")
    else:
        try:
            for path, records in PEEKS[p.dataset](p):
                try:
                    first = list(islice(records, PEEK_RECORDS))
                finally:
                    getattr(records, "close", lambda: None)()  # generators hold the file open
                if first:
                    lines.append(f"{path}: ok (first {len(first)} records parse)")
                else:
                    problems.append(f"{path}: no records")
        except GtiError as e:
            problems.append(str(e))
    if not cfg.sids.imported:
        problems += sid_problems(steps)
    return lines, problems


# ----------------------------------------------------------------------------------------- run
def run(cfg: ProtocolConfig) -> list[str]:
    if cfg.source is not None:
        cfg.prepare.source = cfg.source
    steps = commands(cfg)
    lines, problems = check(cfg, steps)
    p = cfg.prepare
    print(
        f"[gti.protocol] {' '.join(filter(None, [p.dataset, p.category]))} from {p.source}; arms: {', '.join(cfg.arms)}"
    )
    for line in lines:
        print(f"  {line}")
    if problems:
        raise ConfigError("protocol check failed:\n  - " + "\n  - ".join(problems))
    printed = [shell(m, a) for m, a in steps]
    print("[gti.protocol] " + ("would run:" if cfg.dry_run else "running:"))
    for n, cmd in enumerate(printed, 1):
        print(f"  {n}. {cmd}")
    if cfg.dry_run:
        print("[gti.protocol] dry run: nothing was trained; dry_run=false runs these in order")
        return printed
    missing = [m for m, _ in steps if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"stage modules not found: {', '.join(sorted(set(missing)))}")
    for n, (module, argv) in enumerate(steps, 1):
        print(f"[gti.protocol] step {n}/{len(steps)}: {printed[n - 1]}", flush=True)
        done = subprocess.run([sys.executable, "-m", module, *argv])
        if done.returncode != 0:
            raise GtiError(f"step {n} ({module}) failed with exit code {done.returncode}; later steps not run")
    return printed
