"""How much bf16 ranking changes a finished fine-tuning run's recommendations (docs/traps.md).

Loads RUN_DIR/model with plain transformers, rebuilds the test prompts as gti.finetune does (same data
subset, history length, template, trie, beam width) and ranks the first N test users twice with the same
fp32 weights: fp32 arithmetic (eval.precision=fp32) and bf16 autocast (eval.precision=bf16, and what
bf16-mixed training used to rank with). Prints the share of users whose top-K list / top-K set differs,
how far the same SID's beam score moves against the gaps between neighbouring beams, and which of the
two reproduces the run's own predictions.jsonl.
    python scripts/compare_eval_precision.py runs/finetune --users 200
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tqdm import tqdm

from gti.rank.beam_search import constrained_beam_search
from gti.rank.trie import beams_to_items
from gti.train.recommender import ranking_precision
from gti.train.stage import load_finetuned


def rank(model, tok, trie, loader, num_beams: int, precision: str) -> tuple[list[list[int]], list[dict]]:
    """Per user: item ids best first, and {SID: score} of the returned beams."""
    items, scores = [], []
    for batch in tqdm(loader, desc=precision):
        with ranking_precision(model, precision):
            beams = constrained_beam_search(
                model, tok, batch["input_ids"], batch["attention_mask"], trie, num_beams=num_beams, num_return=num_beams
            )
        items += beams_to_items(beams, trie)
        scores += [{tuple(seq): s for seq, s in per_user} for per_user in beams]
    return items, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished gti.finetune output folder")
    ap.add_argument("--users", type=int, default=200, help="first N test users (0: all)")
    ap.add_argument("--k", type=int, default=10, help="length of the compared top lists")
    ap.add_argument("--batch-size", type=int, default=0, help="0: the run's eval.batch_size (same padding)")
    args = ap.parse_args()

    run = load_finetuned(args.run_dir, args.users, args.batch_size)
    model, tok, trie, loader, cfg, test = run.model, run.tokenizer, run.trie, run.loader, run.cfg, run.test
    beams, k = cfg["eval"]["num_beams"], args.k

    items32, scores32 = rank(model, tok, trie, loader, beams, "fp32")
    items16, scores16 = rank(model, tok, trie, loader, beams, "bf16")
    lists = sum(a[:k] != b[:k] for a, b in zip(items32, items16)) / len(test)
    sets = sum(set(a[:k]) != set(b[:k]) for a, b in zip(items32, items16)) / len(test)
    moves = [abs(s - b[sid]) for a, b in zip(scores32, scores16) for sid, s in a.items() if sid in b]
    gaps = [x - y for a in scores32 for s in [sorted(a.values(), reverse=True)] for x, y in zip(s, s[1:])]
    hits = {p: sum(ex.target in its[:k] for ex, its in zip(test, ranked)) / len(test) for p, ranked in (("fp32", items32), ("bf16", items16))}  # fmt: skip
    print(f"{args.run_dir}: {len(test)} test users, beam {beams}, top-{k}")
    print(f"  top-{k} list differs (order or items): {lists:.1%} of users")
    print(f"  top-{k} set differs (items):           {sets:.1%} of users")
    print(f"  same SID's score, |fp32 - bf16|:      mean {statistics.mean(moves):.3f}, max {max(moves):.3f} nats")
    print(f"  gap between neighbouring fp32 beams:  median {statistics.median(gaps):.3f} nats")
    print(f"  recall@{k}: fp32 {hits['fp32']:.4f}, bf16 {hits['bf16']:.4f}")
    # the run's own lists: a check that the prompts were rebuilt as gti.finetune built them
    rows = [json.loads(line) for line in (args.run_dir / "predictions.jsonl").read_text().splitlines()]
    saved = {r["index"]: r["items"][:k] for r in rows}
    same = {p: statistics.mean(saved[ex.index] == its[:k] for ex, its in zip(test, ranked) if ex.index in saved) for p, ranked in (("fp32", items32), ("bf16", items16))}  # fmt: skip
    print(f"  predictions.jsonl ({cfg['eval'].get('precision', 'trainer.precision')} ranking, "
          f"trainer.precision={cfg['trainer']['precision']}) equals the fp32 lists for {same['fp32']:.1%} of users, "
          f"the bf16 lists for {same['bf16']:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
