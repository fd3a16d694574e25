"""How far a finished fine-tuning run's beam search is from the exact ranking of the whole catalogue.

Loads RUN_DIR/model with plain transformers, rebuilds the test prompts as gti.finetune does (same data
subset, history length, template, trie) and ranks the first N test users twice: trie-constrained beam search
with --beams beams, and exact ranking (gti.rank.exact; its top 10, pruned below the 10th beam hypothesis, which
cannot change it: gti.train.recommender.beam_floor). Prints the figures gti.finetune records under
"beam_vs_exact" with eval.exact_check_users, and the seconds per user of each search. --full expands every
trie node instead (every item scored, the cost of eval.ranking=exact) and checks that its top 10 is the
pruned one's. --record also writes the figures into RUN_DIR/metrics.json, where the benchmark report reads them.
    OMP_NUM_THREADS=1 python scripts/beam_vs_exact.py runs/finetune --users 100 --beams 20
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gti.core.config import EvalConfig
from gti.core.io import write_json
from gti.rank.trie import beams_to_items
from gti.train.recommender import agreement, beam_floor, rank_sids
from gti.train.stage import load_finetuned

K = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished gti.finetune output folder")
    ap.add_argument("--users", type=int, default=100, help="first N test users (0: all)")
    ap.add_argument("--beams", type=int, default=20, help="beam width of the compared search")
    ap.add_argument("--batch-size", type=int, default=0, help="0: the run's eval.batch_size")
    ap.add_argument("--full", action="store_true", help="also rank every item (no pruning) and time it")
    ap.add_argument("--record", action="store_true", help='write the figures to RUN_DIR/metrics.json "beam_vs_exact"')
    args = ap.parse_args()

    run = load_finetuned(args.run_dir, args.users, args.batch_size)
    model, tok, trie, loader, cfg = run.model, run.tokenizer, run.trie, run.loader, run.cfg
    ev = EvalConfig(num_beams=args.beams, ks=[K], precision=cfg["eval"].get("precision", "fp32"))

    lists: dict[str, list] = {"beam": [], "exact": [], "full": []}
    seconds = dict.fromkeys(lists, 0.0)
    targets: list[int] = []
    for batch in tqdm(loader, desc="users", unit="batch"):
        t0 = time.perf_counter()
        beams = rank_sids(model, tok, batch, trie, ev, "beam")
        t1 = time.perf_counter()
        exact = rank_sids(model, tok, batch, trie, ev, "exact", floor=beam_floor(beams, K, ev))
        t2 = time.perf_counter()
        seconds["beam"] += t1 - t0
        seconds["exact"] += t2 - t1
        for name, sids in (("beam", beams), ("exact", exact)):
            lists[name] += [its[:K] for its in beams_to_items(sids, trie)]
        if args.full:
            full = rank_sids(model, tok, batch, trie, ev, "exact")
            seconds["full"] += time.perf_counter() - t2
            lists["full"] += [its[:K] for its in beams_to_items(full, trie)]
        targets += batch["target"].tolist()

    n = len(targets)
    fig = agreement(lists["beam"], lists["exact"], targets, K)
    print(f"{args.run_dir}: {n} test users, {trie.num_items} items ({trie.num_nodes} trie nodes), beam {args.beams}, "
          f"{torch.get_num_threads()} thread(s), ranked in {ev.precision}")  # fmt: skip
    print(f"  beam top-{K} equals exact top-{K} (items and order): {fig[f'top{K}_equal']:.1%} of users")
    print(f"  same top-{K} set:                                  {fig[f'top{K}_same_set']:.1%} of users")
    for metric in (f"recall@{K}", f"ndcg@{K}"):
        b, e = fig[metric]["beam"], fig[metric]["exact"]
        print(f"  {metric}: beam {b:.4f}, exact {e:.4f} (exact - beam {e - b:+.4f})")
    print(f"  seconds per user: beam {seconds['beam'] / n:.2f}, exact top-{K} {seconds['exact'] / n:.2f}", end="")
    if args.full:
        same = sum(a == b for a, b in zip(lists["full"], lists["exact"])) / n
        print(f", every item {seconds['full'] / n:.2f} (its top-{K} equals the pruned one for {same:.1%})")
    else:
        print()
    print(json.dumps({"beam_vs_exact": fig}))
    if args.record:
        metrics = args.run_dir / "metrics.json"
        write_json(metrics, {**json.loads(metrics.read_text()), "beam_vs_exact": fig})
        print(f"recorded in {metrics}")


if __name__ == "__main__":
    main()
