"""GTI against every initialisation, over seeds: resumable cells, the report and its plots."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from gti.core.config import FinetuneConfig, GroundConfig, eval_problems
from gti.core.errors import ConfigError, GtiError
from gti.core.io import atomic_write_text, write_json

# method -> (stage-1 init or None for no grounding, stage-2 init, multitask)
METHODS: dict[str, tuple[str | None, str, bool]] = {
    "random": (None, "random", False),
    "mean": (None, "mean", False),
    "description": (None, "description", False),
    "topk": (None, "topk", False),
    "gti-mean": ("mean", "mean", False),  # the paper
    "gti-description": ("description", "description", False),  # ours: GTI warm-started from descriptions
    "multitask-mean": (None, "mean", True),  # LC-Rec-style multi-task SFT
}


@dataclass
class BenchmarkConfig:
    scale: str = "cpu"  # a label written into the report
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    single_seed: list[str] = field(default_factory=lambda: ["random", "description", "topk", "multitask-mean"])
    ground: GroundConfig = field(default_factory=GroundConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    output_dir: str = "runs/benchmark"
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    report_only: bool = False  # true: write the report from the cells finished so far, run nothing
    parallel: int = 1  # cells at once (one GPU: 1); > 1: each cell's output goes to CELL/cell.log
    threads: int = 0  # CPU threads per stage process; 0: the machine's cores // parallel, at least 1


def cells(cfg: BenchmarkConfig) -> list[tuple[str, int]]:
    """Seed-major: every method's first seed runs before any method's second, so an interrupted
    run still has a complete one-seed table."""
    return [(m, s) for i, s in enumerate(cfg.seeds) for m in cfg.methods if i == 0 or m not in cfg.single_seed]


def stage_env(cfg: BenchmarkConfig) -> dict[str, str]:
    """Each stage process gets its share of the cores: torch, MKL and the tokenizers default to every
    core per process, so N processes at once would oversubscribe the machine N-fold."""
    n = cfg.threads or max(1, (os.cpu_count() or 1) // cfg.parallel)
    return {**os.environ, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), "TOKENIZERS_PARALLELISM": "false"}


def _stage(module: str, conf, path: Path, env: dict, log: Path | None) -> None:
    """One stage process; its output goes to the terminal, or appended to `log` when cells run side by side."""
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(conf)))
    cmd = [sys.executable, "-m", module, str(path)]
    with log.open("a") if log else nullcontext() as out:
        if out:
            out.write(f"\n==== {' '.join(cmd)}\n")
            out.flush()
        r = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    if r.returncode != 0:
        where = f"log: {log}" if log else f"its output is above ({path})"
        raise GtiError(f"{module} exited with {r.returncode}; {where}")


def _say(method: str, seed: int, what: str) -> None:
    print(f"[gti.benchmark] {method} seed {seed}: {what}", flush=True)


def run_cell(cfg: BenchmarkConfig, method: str, seed: int) -> Path:
    ground_init, ft_init, multitask = METHODS[method]
    cell = Path(cfg.output_dir) / method / f"seed{seed}"
    ft_dir = cell / "finetune"
    if (ft_dir / "metrics.json").is_file():
        _say(method, seed, "done, skipped")
        return cell
    cell.mkdir(parents=True, exist_ok=True)
    env, log, t = stage_env(cfg), (cell / "cell.log" if cfg.parallel > 1 else None), time.time()
    to_log = f" (log: {log})" if log else ""
    ft = copy.deepcopy(cfg.finetune)
    ft.seed, ft.init, ft.multitask, ft.output_dir = seed, ft_init, multitask, str(ft_dir)
    if ground_init is not None:
        g = copy.deepcopy(cfg.ground)
        g.seed, g.init, g.output_dir = seed, ground_init, str(cell / "ground")
        if not (cell / "ground" / "gti.json").is_file():
            _say(method, seed, "grounding" + to_log)
            _stage("gti.ground", g, cell / "ground.yaml", env, log)
        ft.init_from = str(cell / "ground")
    _say(method, seed, "fine-tuning" + to_log)
    _stage("gti.finetune", ft, cell / "finetune.yaml", env, log)
    _say(method, seed, f"finished in {time.time() - t:.0f}s")
    return cell


def run_cells(cfg: BenchmarkConfig, todo: list[tuple[str, int]]) -> None:
    """Up to `parallel` cells at once, in `todo` order; a cell's ground -> finetune stays in order. A failed
    cell does not stop the others: every failure is listed once all have finished."""

    def one(method: str, seed: int) -> str | None:
        try:
            run_cell(cfg, method, seed)
        except GtiError as e:  # a stage failed: say so now, list it at the end
            _say(method, seed, f"FAILED: {e}")
            return f"{method} seed {seed}: {e}"
        return None

    with ThreadPoolExecutor(cfg.parallel) as pool:
        futures = [pool.submit(one, m, s) for m, s in todo]
        try:
            failed = [r for r in (f.result() for f in futures) if r]
        except KeyboardInterrupt:  # Ctrl-C reached the running stages too; start no further cell
            pool.shutdown(cancel_futures=True)
            raise
    if failed:
        raise GtiError(
            f"{len(failed)} of {len(todo)} cells failed; the others finished. Run the same command again to retry "
            "them, or add report_only=true to report the finished ones:\n  - " + "\n  - ".join(failed)
        )


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def list_diversity(predictions: Path, k: int = 10) -> dict:
    """How personal the top-k lists are: the share of users with a list nobody else got, and how many
    distinct items appear in any top-k. A model that ignores the history gives everyone one list."""
    lists = [tuple(json.loads(line)["items"][:k]) for line in predictions.read_text().splitlines() if line.strip()]
    counts: dict = {}
    for items in lists:
        counts[items] = counts.get(items, 0) + 1
    return {"k": k, "users": len(lists), "unique_list_share": sum(c == 1 for c in counts.values()) / max(len(lists), 1),
            "items_covered": len({i for items in lists for i in items})}  # fmt: skip


def collect(cfg: BenchmarkConfig) -> dict:
    out: dict = {"scale": cfg.scale, "methods": {}}
    for method in cfg.methods:
        runs = []
        for m, seed in cells(cfg):
            if m != method:
                continue
            cell = Path(cfg.output_dir) / method / f"seed{seed}"
            if not (cell / "finetune" / "gti.json").is_file():
                continue  # not run (yet): the report covers finished cells only
            ft = json.loads((cell / "finetune" / "gti.json").read_text())
            g = json.loads((cell / "ground" / "gti.json").read_text()) if (cell / "ground" / "gti.json").is_file() else None
            runs.append({"seed": seed, "test": ft["metrics"]["test"], "baselines": ft["metrics"]["baselines"]["test"],
                         "lists": list_diversity(cell / "finetune" / "predictions.jsonl"),
                         "cost": {"finetune": {"wall_s": ft["metrics"]["wall_time_s"], **ft["cost"]},
                                  **({"ground": {"wall_s": g["wall_time_s"], **g["cost"]}} if g else {})},
                         "diagnostics": {**({"init": g["diagnostics"]["init"], "grounded": g["diagnostics"]["final"]} if g and g["diagnostics"] else {}),
                                         "finetuned": ft["diagnostics"]}})  # fmt: skip
        if not runs:
            continue
        metrics = {}
        for key in runs[0]["test"]:
            if "@" in key:
                metrics[key] = _mean_std([r["test"][key] for r in runs])
        lists = {key: _mean_std([r["lists"][key] for r in runs]) for key in ("unique_list_share", "items_covered")}
        out["methods"][method] = {"seeds": [r["seed"] for r in runs], "metrics": metrics, "lists": lists, "runs": runs}
    if not out["methods"]:
        raise ConfigError(f"output_dir: no finished cell under {cfg.output_dir} to report on; run the benchmark first")
    first = next(iter(out["methods"].values()))["runs"][0]
    out["popularity"] = first["baselines"]["popularity"]
    out["random_list"] = first["baselines"]["random"]
    out["test_users"] = first["lists"]["users"]
    return out


def results_markdown(res: dict, ks: list[int]) -> str:
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    base = res["methods"].get("mean", {}).get("metrics", {})
    lines = [
        f"# gti benchmark, scale: {res['scale']}",
        "",
        "Test split, mean ± std over seeds; Δ = relative change of mean over `mean` init.",
        "",
        _resolution(res),
        "",
        "| method | seeds | " + " | ".join(cols) + " | Δ recall@10 |",
        "|---|---|" + "---|" * len(cols) + "---|",
    ]
    for name, m in res["methods"].items():
        cells_ = [f"{m['metrics'][c][0]:.4f} ± {m['metrics'][c][1]:.4f}" if c in m["metrics"] else "–" for c in cols]
        r10, b10 = m["metrics"].get("recall@10", (0, 0))[0], base.get("recall@10", (0, 0))[0]
        delta = f"{100 * (r10 - b10) / b10:+.1f}%" if b10 else "–"
        lines.append(f"| {name} | {len(m['seeds'])} | " + " | ".join(cells_) + f" | {delta} |")
    for label, key in (("popularity", "popularity"), ("random items", "random_list")):
        lines.append(f"| *{label}* | – | " + " | ".join(f"{res[key].get(c, 0):.4f}" for c in cols) + " | |")
    lines += ["", "## How personal the top-10 lists are (mean ± std over seeds)", "",
              "A model that ignores the history gives every user the same list (unique share 0, 10 items covered).", "",
              "| method | users with a list of their own | distinct items in any top-10 |", "|---|---|---|"]  # fmt: skip
    for name, m in res["methods"].items():
        (u, us), (c, cs) = m["lists"]["unique_list_share"], m["lists"]["items_covered"]
        lines.append(f"| {name} | {100 * u:.0f}% ± {100 * us:.0f}% | {c:.0f} ± {cs:.0f} |")
    lines += ["", "## Diagnostics of the new-token rows (seed of the first run)", "",
              "| method | stage | effective rank | mean cosine | RSA (Spearman) |", "|---|---|---|---|---|"]  # fmt: skip
    for name, m in res["methods"].items():
        for stage, d in m["runs"][0]["diagnostics"].items():
            rsa = d.get("rsa", {}).get("spearman")
            lines.append(f"| {name} | {stage} | {d.get('effective_rank', float('nan')):.1f} | {d.get('mean_cosine', float('nan')):.3f} | "
                         + (f"{rsa:.3f}" if rsa is not None else "–") + " |")  # fmt: skip
    lines += ["", "## Cost per run (first seed)", "", "| method | stage | wall (s) | peak RSS (MB) |", "|---|---|---|---|"]
    for name, m in res["methods"].items():
        for stage, c in m["runs"][0]["cost"].items():
            lines.append(f"| {name} | {stage} | {c['wall_s']:.0f} | {c['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def _resolution(res: dict) -> str:
    """What the number of test users can resolve: one hit, and the binomial standard error at popularity's recall@10."""
    n, p = res["test_users"], res["popularity"].get("recall@10", 0.0)
    return (f"{n} test users: one hit moves recall by {1 / n:.4f}; the binomial standard error of a recall@10 "
            f"near popularity's ({p:.4f}) is ±{math.sqrt(p * (1 - p) / n):.4f}.")  # fmt: skip


def plots(cfg: BenchmarkConfig, res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gti.analysis.diagnostics import plot_cosine_maps, plot_spectrum

    rows = {}
    for name in res["methods"]:
        cell = Path(cfg.output_dir) / name / f"seed{res['methods'][name]['seeds'][0]}" / "finetune"
        rows[name] = new_rows_from_run(cell)
    plot_spectrum(rows, out / "spectra.png")
    plot_cosine_maps(rows, out / "cosine_maps.png")
    ks = cfg.ks
    fig, ax = plt.subplots(figsize=(2 + 1.5 * len(res["methods"]), 4))
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        means = [m["metrics"][f"recall@{k}"][0] for m in res["methods"].values()]
        stds = [m["metrics"][f"recall@{k}"][1] for m in res["methods"].values()]
        ax.bar([i + j * width for i in range(len(means))], means, width, yerr=stds, capsize=3, label=f"recall@{k}")
        ax.axhline(res["popularity"][f"recall@{k}"], color=f"C{j}", ls="--", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(res["methods"]))], list(res["methods"]), rotation=20)
    ax.set_ylabel("test recall (dashed: popularity)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)


def new_rows_from_run(run: Path):
    import torch
    from safetensors import safe_open

    meta = json.loads((run / "gti.json").read_text())
    start, n = meta["new_tokens"]["start"], meta["new_tokens"]["count"]
    with safe_open(str(next((run / "model").glob("*.safetensors"))), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        return f.get_slice(key)[start : start + n].to(torch.float32)


def check_same_sids(cfg: BenchmarkConfig) -> None:
    """Grounded and ungrounded methods are compared on one SID index: when any method grounds, the
    ground and finetune sections must name the same dataset and SID settings (else the second stage
    to run would stop at the index the first one built, see gti.sids)."""
    from gti.indexing.build import quantizer_settings
    from gti.indexing.guard import settings_diff

    if not any(METHODS[m][0] is not None for m in cfg.methods):
        return  # the ground section is unused
    g, f = cfg.ground, cfg.finetune
    problems = [f"ground.data.{k}={getattr(g.data, k)} vs finetune.data.{k}={getattr(f.data, k)}"
                for k in ("name", "root") if getattr(g.data, k) != getattr(f.data, k)]  # fmt: skip
    diff = settings_diff(quantizer_settings(g.sids), quantizer_settings(f.sids))
    problems += [f"ground.sids.{k}={a} vs finetune.sids.{k}={b}" for k, (a, b) in diff.items()]
    if problems:
        raise ConfigError("ground and finetune must use the same dataset and SIDs:\n  - " + "\n  - ".join(problems))


def run(cfg: BenchmarkConfig) -> Path:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"methods: unknown {unknown}; known: {', '.join(METHODS)}")
    if cfg.report_only:
        return report(cfg)
    # every cell shares the eval section: fail now, not after the first grounding
    problems = [f"finetune.{p}" for p in eval_problems(cfg.finetune.eval)]
    if cfg.parallel < 1 or cfg.threads < 0:
        problems.append(f"parallel={cfg.parallel} must be >= 1 and threads={cfg.threads} >= 0 (0: cores // parallel)")
    if problems:
        raise ConfigError.listing(problems)
    check_same_sids(cfg)
    todo = cells(cfg)
    threads = stage_env(cfg)["OMP_NUM_THREADS"]
    print(f"[gti.benchmark] {len(todo)} cells, {cfg.parallel} at a time, {threads} CPU threads per stage process: "
          + ", ".join(f"{m}/s{s}" for m, s in todo))  # fmt: skip
    run_cells(cfg, todo)
    return report(cfg)


def report(cfg: BenchmarkConfig) -> Path:
    """results.md / results.json / plots from the finished cells (also usable mid-benchmark)."""
    res = collect(cfg)
    out = Path(cfg.output_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", results_markdown(res, cfg.ks))
    plots(cfg, res, out)
    print(results_markdown(res, cfg.ks))
    print(f"[gti.benchmark] report -> {out}")
    return out
