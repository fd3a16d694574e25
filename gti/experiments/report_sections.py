"""Sections of the benchmark's results.md read from results.json: which users each row covers, the reference rows, the
paired differences with their intervals and a reading of them in plain words, and beam search against exact ranking."""

from __future__ import annotations

NAMES = {"recall@10": "recall@10", "ndcg@10": "NDCG@10"}


def users_line(res: dict) -> str:
    n, cap = res["test_users"], res.get("eval_max_users", 0)
    line = "The arms' rows, popularity and random items cover " + (
        f"the first {n} test users (finetune.eval.max_users={cap})." if cap else f"all {n} test users."
    )
    for name, r in res.get("references", {}).items():
        run = r["runs"][0]
        line += (f" {name} ranks all of its {run['users']} test users over the whole catalogue; its second row and every "
                 f"paired comparison with it use the arms' {run['on_arm_users']['users']}.")  # fmt: skip
    return line


def reference_rows(res: dict, cols: list[str]) -> list[str]:
    """Rows of the main table for each reference: over all its users, and over the arms' users."""
    lines = []
    for name, r in res.get("references", {}).items():
        run = r["runs"][0]
        every = " | ".join(f"{run['test'][c]:.4f}" if c in run["test"] else "–" for c in cols)
        ours = " | ".join(f"{run['on_arm_users'][c]:.4f}" if c in run["on_arm_users"] else "–" for c in cols)
        seeds = len(r["seeds"])
        lines.append(f"| *{name} (reference), all {run['users']} users* | {seeds} | {every} | |")
        lines.append(f"| *{name} (reference), the arms' {run['on_arm_users']['users']} users* | {seeds} | {ours} | |")
    return lines


def _ci(d: dict) -> str:
    text = f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    return f"**{text}**" if d["holds"] else text


def _groups(paired: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict = {}
    for d in paired:
        out.setdefault((d["a"], d["b"]), []).append(d)
    return out


def _seeds(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def paired_markdown(res: dict) -> list[str]:
    paired = res.get("paired", [])
    if not paired:
        return []
    boot = res["paired_bootstrap"]
    lines = ["", f"## Paired differences ({100 * boot['level']:.0f} % bootstrap intervals over test users)", "",
             f"Δ = first minus second on the same test users, each user's held-out item ranked by both; "
             f"[lo, hi]: {100 * boot['level']:.0f} % percentile interval over {boot['resamples']} resamples of the users "
             f"(random generator seeded with {boot['seed']}). **Bold**: the interval excludes 0, the difference holds. Pooled: each user's "
             "difference averaged over the seeds both rows have, users resampled.", "",
             "| comparison | seeds | users | Δ recall@10 | Δ NDCG@10 |", "|---|---|---|---|---|"]  # fmt: skip
    for (a, b), ds in _groups(paired).items():
        pooled = {d["metric"]: d for d in ds if d["seed"] == "pooled"}
        r, n = pooled["recall@10"], pooled["ndcg@10"]
        scope = f"pooled {_seeds(r['seeds'])}" if len(r["seeds"]) > 1 else f"seed {r['seeds'][0]}"
        lines.append(f"| {a} − {b} | {scope} | {r['users']} | {_ci(r)} | {_ci(n)} |")
        if len(r["seeds"]) > 1:
            for s in r["seeds"]:
                one = {d["metric"]: d for d in ds if d["seed"] == s}
                lines.append(
                    f"| | seed {s} | {one['recall@10']['users']} | {_ci(one['recall@10'])} | {_ci(one['ndcg@10'])} |"
                )
    return lines + ["", "### Reading", "", *reading(paired)]


def _phrase(d: dict) -> str:
    what = f"{NAMES[d['metric']]} {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    if d["holds"]:
        return f"{what} holds ({d['a'] if d['diff'] > 0 else d['b']} higher)"
    return f"{what} does not hold (the interval contains 0)"


def reading(paired: list[dict]) -> list[str]:
    """One line per comparison, generated from the numbers: which differences hold pooled, and in how many seeds."""
    lines, hold, not_hold = [], [], []
    for (a, b), ds in _groups(paired).items():
        pooled = [d for d in ds if d["seed"] == "pooled"]
        seeds = pooled[0]["seeds"]
        scope = f"pooled over seeds {_seeds(seeds)}" if len(seeds) > 1 else f"seed {seeds[0]} only"
        line = f"- **{a} − {b}** ({scope}, {pooled[0]['users']} users): " + "; ".join(_phrase(d) for d in pooled) + "."
        if len(seeds) > 1:
            per = []
            for d in pooled:
                one = {e["seed"]: e for e in ds if e["metric"] == d["metric"]}
                held = [s for s in seeds if one[s]["holds"]]
                same = [s for s in held if (one[s]["diff"] > 0) == (d["diff"] > 0)]  # the pooled difference's sign
                other = [s for s in held if s not in same]
                per.append(
                    f"{NAMES[d['metric']]} in {len(same)} of {len(seeds)}"
                    + (f" (seed {_seeds(same)})" if same else "")
                    + (f", the other way in seed {_seeds(other)}" if other else "")
                )
            line += " Per seed, with the pooled sign, it holds for " + ", ".join(per) + "."
        lines.append(line)
        held, by_winner = [NAMES[d["metric"]] for d in pooled if d["holds"]], {}
        for d in (d for d in pooled if d["holds"]):
            by_winner.setdefault((a, b) if d["diff"] > 0 else (b, a), []).append(NAMES[d["metric"]])
        hold += [f"{w} > {lo} ({', '.join(ms)})" for (w, lo), ms in by_winner.items()]
        if len(held) < len(pooled):
            not_hold.append(f"{a} vs {b}" + (f" ({', '.join(NAMES[d['metric']] for d in pooled if not d['holds'])})"
                                             if held else ""))  # fmt: skip
    lines += ["", "In short: " + (f"these differences hold: {'; '.join(hold)}." if hold else "no difference holds.")
              + (f" These do not (interval contains 0): {'; '.join(not_hold)}." if not_hold else "")]  # fmt: skip
    return lines


def _share(value: float | int, users: int) -> str:
    """A count of users or a share of them, shown as a percentage."""
    share = value / users if isinstance(value, int) and users else float(value)
    return f"{100 * share:.0f}%"


def beam_vs_exact_markdown(res: dict) -> list[str]:
    checks = res.get("beam_vs_exact", {})
    if not checks:
        return []
    lines = ["", "## Beam search vs exact ranking", "",
             "On a sample of test users, the top 10 of beam search against the exact ranking of every catalogue item "
             "by the model's log-probability of its SID.", "",
             "| method | seed | users | same top-10 (order) | same top-10 (set) | recall@10 beam / exact | NDCG@10 beam / exact |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, rows in checks.items():
        for r in rows:
            n = r["users"]
            rec, ndcg = r["recall@10"], r["ndcg@10"]
            lines.append(f"| {method} | {r['seed']} | {n} | {_share(r['top10_equal'], n)} | {_share(r['top10_same_set'], n)} "
                         f"| {rec['beam']:.4f} / {rec['exact']:.4f} | {ndcg['beam']:.4f} / {ndcg['exact']:.4f} |")  # fmt: skip
    return lines
