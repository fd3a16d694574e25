"""The benchmark's report from its finished cells: results.json, results.md (means over seeds, paired differences with
bootstrap intervals and their reading, the reference rows, beam vs exact ranking) and plots (spectra, cosine maps,
metric bars)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from gti.core.errors import ConfigError
from gti.core.io import atomic_write_text, write_json
from gti.core.log import get_logger
from gti.core.runs import read_run
from gti.experiments.report_sections import beam_vs_exact_markdown, paired_markdown, reference_rows, users_line
from gti.experiments.runner import finished
from gti.experiments.stats import LEVEL, N_BOOT, Ranks, check_paired, comparisons, per_user, read_ranks

log = get_logger("benchmark")

# method -> [(seed, cell folder)] of every planned cell, finished or not, in the order they run
Planned = dict[str, list[tuple[int, Path]]]


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


def _cell_result(seed: int, cell: Path) -> dict:
    ft = read_run(cell / "finetune", "finetune").meta
    g = read_run(cell / "ground", "ground").meta if (cell / "ground" / "gti.json").is_file() else None
    return {"seed": seed, "test": ft["metrics"]["test"], "baselines": ft["metrics"]["baselines"]["test"],
            "lists": list_diversity(cell / "finetune" / "predictions.jsonl"),
            "cost": {"finetune": {"wall_s": ft["metrics"]["wall_time_s"], **ft["cost"]},
                     **({"ground": {"wall_s": g["wall_time_s"], **g["cost"]}} if g else {})},
            "diagnostics": {**({"init": g["diagnostics"]["init"], "grounded": g["diagnostics"]["final"]} if g and g["diagnostics"] else {}),
                            "finetuned": ft["diagnostics"]}}  # fmt: skip


def _reference_result(name: str, seed: int, cell: Path, arms: tuple[Ranks, Path], ks: list[int]) -> dict:
    """A reference run's test metrics over every user it ranked, and again over the arms' test users (`arms`: one
    arm cell's ranks and file; the reference must rank each of its users on the same held-out item)."""
    run = cell / name
    ranks = read_ranks(run / "predictions.jsonl")
    arm_users = sorted(arms[0])
    check_paired(ranks, run / "predictions.jsonl", *arms, arm_users)
    on = np.array([ranks[u] for u in arm_users])
    test = json.loads((run / "metrics.json").read_text())["test"]
    return {"seed": seed, "test": test, "users": len(ranks),
            "on_arm_users": {"users": len(on), **{f"{m}@{k}": float(per_user(on, f"{m}@{k}").mean())
                                                  for k in ks for m in ("recall", "ndcg")}}}  # fmt: skip


def collect(scale: str, planned: Planned, output_dir: str, references: Planned | None = None, ks=(5, 10, 20)) -> dict:
    out: dict = {"scale": scale, "methods": {}}
    for method, cells in planned.items():
        # not run (yet): the report covers finished cells only
        runs = [_cell_result(seed, cell) for seed, cell in cells if finished(cell / "finetune", "finetune")]
        if not runs:
            continue
        metrics = {}
        for key in runs[0]["test"]:
            if "@" in key:
                metrics[key] = _mean_std([r["test"][key] for r in runs])
        lists = {key: _mean_std([r["lists"][key] for r in runs]) for key in ("unique_list_share", "items_covered")}
        out["methods"][method] = {"seeds": [r["seed"] for r in runs], "metrics": metrics, "lists": lists, "runs": runs}
    if not out["methods"]:
        raise ConfigError(f"output_dir: no finished cell under {output_dir} to report on; run the benchmark first")
    first = next(iter(out["methods"].values()))["runs"][0]
    out["popularity"] = first["baselines"]["popularity"]
    out["random_list"] = first["baselines"]["random"]
    out["test_users"] = first["lists"]["users"]
    first_cell = dict(planned[next(iter(out["methods"]))])[first["seed"]]
    out["eval_max_users"] = OmegaConf.load(first_cell / "finetune" / "config.yaml").eval.max_users
    preds = {m: {s: c / "finetune" / "predictions.jsonl" for s, c in planned[m] if s in r["seeds"]}
             for m, r in out["methods"].items()}  # fmt: skip
    arm_file = next(iter(next(iter(preds.values())).values()))
    arms = (read_ranks(arm_file), arm_file)  # every cell ranks the same test users (the pairing checks it)
    out["references"], ref_preds = {}, {}
    for name, runs in (references or {}).items():
        done = [(s, c) for s, c in runs if finished(c / name, name)]
        if done:
            results = [_reference_result(name, s, c, arms, list(ks)) for s, c in done]
            out["references"][name] = {"seeds": [s for s, _ in done], "runs": results}
            ref_preds[name] = {s: c / name / "predictions.jsonl" for s, c in done}
    out["paired"] = [d.to_json() for d in comparisons(preds, ref_preds)]
    out["paired_bootstrap"] = {"resamples": N_BOOT, "level": LEVEL, "seed": 0}
    bve = {m: _beam_vs_exact([(s, c) for s, c in planned[m] if s in r["seeds"]]) for m, r in out["methods"].items()}
    out["beam_vs_exact"] = {m: rows for m, rows in bve.items() if rows}
    return out


def _beam_vs_exact(cells: list[tuple[int, Path]]) -> list[dict]:
    """The cells' beam-vs-exact checks (fine-tuning's metrics.json has one when it ranked a sample both ways)."""
    rows = []
    for seed, cell in cells:
        metrics = json.loads((cell / "finetune" / "metrics.json").read_text())
        if "beam_vs_exact" in metrics:
            rows.append({"seed": seed, **metrics["beam_vs_exact"]})
    return rows


def results_markdown(res: dict, ks: list[int]) -> str:
    cols = [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")]
    base = res["methods"].get("mean", {}).get("metrics", {})
    lines = [
        f"# gti benchmark, scale: {res['scale']}",
        "",
        "Test split, mean ± std over seeds; Δ = relative change of mean over `mean` init.",
        "",
        users_line(res),
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
    lines += reference_rows(res, cols)
    lines += paired_markdown(res)
    lines += beam_vs_exact_markdown(res)
    lines += ["", "## How personal the top-10 lists are (mean ± std over seeds)", "",
              "A model that ignores the history gives every user the same list (unique share 0, 10 items covered).", "",
              "| method | users with a list of their own | distinct items in any top-10 |", "|---|---|---|"]  # fmt: skip
    for name, m in res["methods"].items():
        (u, us), (c, cs) = m["lists"]["unique_list_share"], m["lists"]["items_covered"]
        lines.append(f"| {name} | {100 * u:.0f}% ± {100 * us:.0f}% | {c:.0f} ± {cs:.0f} |")
    lines += ["", "## Diagnostics of the new-token rows (seed of the first run)", "",
              "Moved: how far the stage took the rows from where it started them, as the relative change of the table "
              "and each row's cosine with its own start (1: unmoved).", "",
              "| method | stage | effective rank | mean cosine | RSA (Spearman) | moved: relative change / cosine to start |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in res["methods"].items():
        for stage, d in m["runs"][0]["diagnostics"].items():
            rsa, moved = d.get("rsa", {}).get("spearman"), d.get("moved") or {}
            lines.append(f"| {name} | {stage} | {d.get('effective_rank', float('nan')):.1f} | {d.get('mean_cosine', float('nan')):.3f} | "
                         + (f"{rsa:.3f}" if rsa is not None else "–") + " | " + _moved(moved) + " |")  # fmt: skip
    lines += ["", "## Cost per run (first seed)", "", "| method | stage | wall (s) | peak RSS (MB) |", "|---|---|---|---|"]  # fmt: skip
    for name, m in res["methods"].items():
        for stage, c in m["runs"][0]["cost"].items():
            lines.append(f"| {name} | {stage} | {c['wall_s']:.0f} | {c['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def _moved(moved: dict) -> str:
    change, cosine = moved.get("relative_change"), moved.get("cosine_to_start")
    if cosine is None:  # the init snapshot, or a run from before the number was recorded
        return "–"
    return f"{change:.2f} / {cosine:.3f}" if change is not None else f"– / {cosine:.3f}"


def _resolution(res: dict) -> str:
    """What the number of test users can resolve: one hit, and the binomial standard error at popularity's recall@10."""
    n, p = res["test_users"], res["popularity"].get("recall@10", 0.0)
    return (f"{n} test users: one hit moves recall by {1 / n:.4f}; the binomial standard error of a recall@10 "
            f"near popularity's ({p:.4f}) is ±{math.sqrt(p * (1 - p) / n):.4f}.")  # fmt: skip


def plots(res: dict, planned: Planned, ks: list[int], out: Path) -> None:
    from gti.analysis.diagnostics import new_figure, plot_cosine_maps, plot_spectrum
    from gti.core.io import save_figure

    rows, weightless = {}, []
    for name, m in res["methods"].items():  # the rows of each method's first finished seed
        run = dict(planned[name])[m["seeds"][0]] / "finetune"
        found = new_rows_from_run(run)
        if found is None:
            weightless.append(str(run))
        else:
            rows[name] = found
    if weightless:  # run folders copied without their weights (scripts/gpu_check.sh packs them so)
        log.info("spectra and cosine maps leave out %d methods: no model weights in %s", len(weightless), ", ".join(weightless))
    if rows:
        plot_spectrum(rows, out / "spectra.png")
        plot_cosine_maps(rows, out / "cosine_maps.png")
    fig = new_figure((2 + 1.5 * len(res["methods"]), 4))
    ax = fig.add_subplot()
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
    save_figure(fig, out / "metrics.png", dpi=120)


def new_rows_from_run(run: Path):
    """The fine-tuned new rows (n_new, d) in fp32, None when the run folder holds no weights."""
    import torch
    from safetensors import safe_open

    done = read_run(run)
    start, tokens = done.new_tokens
    weights = next(done.model_dir.glob("*.safetensors"), None)
    if weights is None:
        return None
    with safe_open(str(weights), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        return f.get_slice(key)[start : start + len(tokens)].to(torch.float32)  # (n_new, d)


def write_report(
    scale: str, planned: Planned, ks: list[int], output_dir: str, references: Planned | None = None
) -> Path:
    """results.md / results.json / plots from the finished cells (also usable mid-benchmark); `references`: the
    reference rows' cells (name -> [(seed, cell folder)], the run in CELL/NAME)."""
    res = collect(scale, planned, output_dir, references, ks)
    out = Path(output_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    atomic_write_text(out / "results.md", results_markdown(res, ks))
    plots(res, planned, ks, out)
    print(results_markdown(res, ks))  # the command's result
    log.info("report -> %s", out)
    return out
