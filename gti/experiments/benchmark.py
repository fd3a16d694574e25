"""GTI against every initialisation, over seeds: one cell (arm x seed) at a time or side by side, resumable."""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gti.core.checks import eval_problems
from gti.core.config import FinetuneConfig, GroundConfig, SasrecConfig
from gti.core.errors import ConfigError, GtiError
from gti.core.log import get_logger
from gti.experiments.arms import ARMS
from gti.experiments.report import Planned, write_report
from gti.experiments.runner import DeviceFault, Step, run_step, runs_here, stage_env, stage_threads

log = get_logger("benchmark")

# reference rows: classic recommenders trained on the same split, ranked over the whole catalogue -> their command
REFERENCES = {"sasrec": "gti.sasrec"}
DOING = {"gti.ground": "grounding", "gti.finetune": "fine-tuning", "gti.sasrec": "training SASRec"}


@dataclass
class BenchmarkConfig:
    scale: str = "cpu"  # a label written into the report
    methods: list[str] = field(default_factory=lambda: list(ARMS))  # rows of gti.experiments.arms.ARMS
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    single_seed: list[str] = field(default_factory=lambda: ["description", "topk", "multitask-mean"])
    ground: GroundConfig = field(default_factory=GroundConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # the SASRec reference row (seed, output_dir, eval.ks and the dataset's name, root and users are set per cell)
    sasrec: SasrecConfig = field(default_factory=SasrecConfig)
    reference: list[str] = field(default_factory=lambda: ["sasrec"])  # reference rows, first seed only; []: none
    output_dir: str = "runs/benchmark"
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    report_only: bool = False  # true: write the report from the cells finished so far, run nothing
    parallel: int = 1  # cells at once (one GPU: 1); > 1: each cell's output goes to CELL/cell.log
    threads: int = 0  # CPU threads per stage; 0: the machine's cores // parallel, at least 1
    # parallel=1: each stage runs inside the benchmark's process, saving the ~10-15 s a new Python process spends
    # importing torch, Lightning and transformers; false: a fresh process per stage, so a crash or a GPU fault
    # cannot outlive its stage. Cells side by side (parallel > 1) and stages on several devices always get processes
    in_process: bool = True


def cells(cfg: BenchmarkConfig) -> list[tuple[str, int]]:
    """Seed-major: every method's first seed runs before any method's second, so an interrupted
    run still has a complete one-seed table."""
    return [(m, s) for i, s in enumerate(cfg.seeds) for m in cfg.methods if i == 0 or m not in cfg.single_seed]


def schedule(cfg: BenchmarkConfig) -> list[tuple[str, int]]:
    """What runs, in order: the first seed's arm cells, then each reference (first seed only), then the other seeds."""
    arms, first = cells(cfg), cfg.seeds[:1]
    n = sum(s in first for _, s in arms)  # cells() is seed-major: the first seed's cells come first
    return arms[:n] + [(r, s) for r in cfg.reference for s in first] + arms[n:]


def stages_here(cfg: BenchmarkConfig) -> bool:
    """Whether stages run inside this process (in_process); cells side by side always get processes."""
    return cfg.in_process and cfg.parallel == 1


def cell_dir(cfg: BenchmarkConfig, method: str, seed: int) -> Path:
    return Path(cfg.output_dir) / method / f"seed{seed}"


def _say(method: str, seed: int, what: str) -> None:
    log.info("%s seed %s: %s", method, seed, what)


def cell_steps(cfg: BenchmarkConfig, method: str, seed: int) -> list[Step]:
    """The cell's stages, each from a YAML written into the cell folder: grounding when the arm grounds, then
    fine-tuning (from the grounded folder, or from the base model with the arm's init). A reference is one stage."""
    if method in REFERENCES:
        return [reference_step(cfg, method, seed)]
    arm, cell = ARMS[method], cell_dir(cfg, method, seed)
    ft = copy.deepcopy(cfg.finetune)
    ft.seed, ft.init, ft.multitask, ft.output_dir = seed, arm.init, arm.multitask, str(cell / "finetune")
    steps = []
    if arm.grounds:
        g = copy.deepcopy(cfg.ground)
        g.seed, g.init, g.output_dir = seed, arm.ground, str(cell / "ground")
        steps.append(Step.from_config("gti.ground", g, cell / "ground.yaml"))
        ft.init_from = g.output_dir
    return [*steps, Step.from_config("gti.finetune", ft, cell / "finetune.yaml")]


def reference_step(cfg: BenchmarkConfig, name: str, seed: int) -> Step:
    """The reference's run on the arms' split: the finetune section's dataset, the same users kept
    (max_items / max_users) and cut-offs (eval.ks); its own history length (data.max_history: the sequence it reads)."""
    ref, cell = copy.deepcopy(cfg.sasrec), cell_dir(cfg, name, seed)
    ref.seed, ref.output_dir, ref.eval.ks = seed, str(cell / name), list(cfg.finetune.eval.ks)
    for key in ("name", "root", "max_items", "max_users"):
        setattr(ref.data, key, getattr(cfg.finetune.data, key))
    return Step.from_config(REFERENCES[name], ref, cell / f"{name}.yaml")


def run_cell(cfg: BenchmarkConfig, method: str, seed: int) -> Path:
    cell, steps = cell_dir(cfg, method, seed), cell_steps(cfg, method, seed)
    done = [step.finished() for step in steps]  # every finished step checks its settings, not only the last
    if done[-1]:
        _say(method, seed, "done, skipped")
        return cell
    cell.mkdir(parents=True, exist_ok=True)
    env, t = stage_env(cfg.threads, cfg.parallel), time.time()
    log_file = cell / "cell.log" if cfg.parallel > 1 else None
    to_log = f" (log: {log_file})" if log_file else ""
    here = stage_threads(cfg.threads, 1) if stages_here(cfg) else 0

    def say(what: str) -> None:
        _say(method, seed, what)

    for step in steps:  # in this process only a stage that starts no other ranks (runs_here)
        run_step(step, say, DOING[step.module] + to_log, env, log_file, here if runs_here(step.config) else 0)
    _say(method, seed, f"finished in {time.time() - t:.0f}s")
    return cell


def run_cells(cfg: BenchmarkConfig, todo: list[tuple[str, int]]) -> None:
    """Up to `parallel` cells at once, in `todo` order; a cell's ground -> finetune stays in order. A failed
    cell does not stop the others: every failure is listed once all have finished."""

    def one(method: str, seed: int) -> str | None:
        try:
            run_cell(cfg, method, seed)
        except DeviceFault:  # this process cannot run another stage
            raise
        except GtiError as e:  # a stage failed: say so now, list it at the end
            _say(method, seed, f"FAILED: {e}")
            return f"{method} seed {seed}: {e}"
        return None

    if cfg.parallel == 1:  # in the main thread, where Ctrl-C reaches a stage running in this process
        failed = [r for r in (one(m, s) for m, s in todo) if r]
    else:
        with ThreadPoolExecutor(cfg.parallel) as pool:
            futures = [pool.submit(one, m, s) for m, s in todo]
            try:
                failed = [r for r in (f.result() for f in futures) if r]
            except KeyboardInterrupt:  # Ctrl-C reached the stage processes too; start no further cell
                pool.shutdown(cancel_futures=True)
                raise
    if failed:
        raise GtiError(
            f"{len(failed)} of {len(todo)} cells failed; the others finished. Run the same command again to retry "
            "them, or add report_only=true to report the finished ones:\n  - " + "\n  - ".join(failed)
        )


def check_same_sids(cfg: BenchmarkConfig) -> None:
    """Grounded and ungrounded methods are compared on one SID index: when any method grounds, the
    ground and finetune sections must name the same dataset and SID settings (else the second stage
    to run would stop at the index the first one built, see gti.sids)."""
    from gti.indexing.build import quantizer_settings
    from gti.indexing.guard import settings_diff

    if not any(ARMS[m].grounds for m in cfg.methods):
        return  # the ground section is unused
    g, f = cfg.ground, cfg.finetune
    problems = [f"ground.data.{k}={getattr(g.data, k)} vs finetune.data.{k}={getattr(f.data, k)}"
                for k in ("name", "root") if getattr(g.data, k) != getattr(f.data, k)]  # fmt: skip
    diff = settings_diff(quantizer_settings(g.sids), quantizer_settings(f.sids))
    problems += [f"ground.sids.{k}={a} vs finetune.sids.{k}={b}" for k, (a, b) in diff.items()]
    if problems:
        raise ConfigError("ground and finetune must use the same dataset and SIDs:\n  - " + "\n  - ".join(problems))


def run(cfg: BenchmarkConfig) -> Path:
    unknown = [f"methods: unknown {m!r}; known: {', '.join(ARMS)}" for m in cfg.methods if m not in ARMS]
    unknown += [
        f"reference: unknown {r!r}; known: {', '.join(REFERENCES)}" for r in cfg.reference if r not in REFERENCES
    ]
    if unknown:
        raise ConfigError.listing(unknown)
    if cfg.report_only:
        return report(cfg)
    # every cell shares the eval section: fail now, not after the first grounding
    problems = [f"finetune.{p}" for p in eval_problems(cfg.finetune.eval)]
    if cfg.parallel < 1 or cfg.threads < 0:
        problems.append(f"parallel={cfg.parallel} must be >= 1 and threads={cfg.threads} >= 0 (0: cores // parallel)")
    if problems:
        raise ConfigError.listing(problems)
    check_same_sids(cfg)
    todo = schedule(cfg)
    how = "in this process" if stages_here(cfg) else "per stage process"
    log.info(f"{len(todo)} cells, {cfg.parallel} at a time, {stage_threads(cfg.threads, cfg.parallel)} CPU threads {how}: "
             + ", ".join(f"{m}/s{s}" for m, s in todo))  # fmt: skip
    run_cells(cfg, todo)
    return report(cfg)


def report(cfg: BenchmarkConfig) -> Path:
    """results.md / results.json / plots from the finished cells (also usable mid-benchmark)."""
    planned: Planned = {m: [(s, cell_dir(cfg, m, s)) for mm, s in cells(cfg) if mm == m] for m in cfg.methods}
    refs: Planned = {r: [(s, cell_dir(cfg, r, s)) for s in cfg.seeds[:1]] for r in cfg.reference}
    return write_report(cfg.scale, planned, cfg.ks, cfg.output_dir, refs)
