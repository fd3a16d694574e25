"""One published setting end to end, as the four stage commands a user could type; a re-run skips the ground and
finetune stages whose run folders are finished (gti.prepare and gti.sids check their own outputs)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from gti.core.checks import eval_problems
from gti.core.config import FinetuneConfig, GroundConfig, PrepareConfig, SidsConfig, load_config
from gti.core.errors import ConfigError, GtiError
from gti.core.log import get_logger
from gti.data.convert import IMPORTERS, output_name
from gti.data.importers import amazon, lcrec, minionerec, p5
from gti.experiments.arms import PROTOCOL_ARMS, protocol_arm
from gti.experiments.runner import StageFailed, Step, run_step

log = get_logger("protocol")
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
    arms: list[str] = field(default_factory=lambda: ["gti", "mean"])  # gti | mean | multitask (arms.PROTOCOL_ARMS)
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


def plan(cfg: ProtocolConfig) -> list[Step]:
    """The stages in the order they run; ground and finetune name the run folder they make."""
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
    todo = [
        Step("gti.prepare", _args(prep)),
        Step("gti.sids", _args({**data, "levels": cfg.sids.levels, "codes": cfg.sids.codes})),
    ]
    if cfg.sids.imported:  # validated, collisions reported and repaired by gti.sids
        todo[1] = Step("gti.sids", _args({**data, "import_index": Path(p.root) / name / f"{name}.index.json"}))
    arms = {a: protocol_arm(a) for a in cfg.arms if a in PROTOCOL_ARMS}  # check() names the unknown ones
    grounded = [arm for arm in arms.values() if arm.grounds]  # one: "gti"
    if grounded:
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
        todo.append(Step("gti.ground", [cfg.ground_config, *_args(ground)], out / "ground"))
    for arm_name, arm in arms.items():
        start = (
            {"init_from": out / "ground"} if arm.grounds else {"init_from": None, "model": cfg.model, "init": arm.init}
        )
        if arm.multitask:
            start["multitask"] = True
        finetune = {**start, **data, **sids, **evaluation, "output_dir": out / f"finetune-{arm_name}"}
        todo.append(Step("gti.finetune", [cfg.finetune_config, *_args(finetune)], out / f"finetune-{arm_name}"))
    return todo


def commands(cfg: ProtocolConfig) -> list[tuple[str, list[str]]]:
    """(module, argv) per stage, in the order they run."""
    return [(s.module, s.argv) for s in plan(cfg)]


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
    """(report lines, problems): every problem found, not just the first, so one run of the check lists them all."""
    lines, problems = [], []
    bad_arms = [a for a in cfg.arms if a not in PROTOCOL_ARMS]
    if bad_arms or not cfg.arms:
        problems.append(f"arms: {bad_arms or 'empty'}; choose from {', '.join(PROTOCOL_ARMS)}")
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
    todo = plan(cfg)
    lines, problems = check(cfg, [(s.module, s.argv) for s in todo])
    p = cfg.prepare
    log.info(
        f"{' '.join(filter(None, [p.dataset, p.category]))} from {p.source}; arms: {', '.join(cfg.arms)}"
        + "".join(f"\n  {line}" for line in lines)
    )
    if problems:
        raise ConfigError("protocol check failed:\n  - " + "\n  - ".join(problems))
    printed = [s.shell() for s in todo]
    log.info("would run:" if cfg.dry_run else "running:")
    print("\n".join(f"  {n}. {cmd}" for n, cmd in enumerate(printed, 1)))  # the commands, to paste or compare
    if cfg.dry_run:
        log.info("dry run: nothing was trained; dry_run=false runs these in order")
        return printed
    missing = [s.module for s in todo if importlib.util.find_spec(s.module) is None]
    if missing:
        raise ConfigError(f"stage modules not found: {', '.join(sorted(set(missing)))}")
    for n, step in enumerate(todo, 1):
        try:  # a finished ground/finetune folder is skipped: the same command resumes an interrupted protocol
            run_step(step, lambda what, n=n: log.info(f"step {n}/{len(todo)}: {what}"), printed[n - 1])
        except StageFailed as e:
            raise GtiError(
                f"step {n} ({step.module}) failed with exit code {e.returncode}; later steps not run"
            ) from None
    return printed
