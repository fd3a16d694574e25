"""How much lower-precision ranking changes a finished fine-tuning run's recommendations (docs/traps.md).

Loads RUN_DIR/model with plain transformers, rebuilds the test prompts as gti.finetune does (same data
subset, history length, template, trie, beam width) and ranks the first N test users with the same fp32
weights in fp32 arithmetic (eval.precision=fp32) and in each of --precisions: bf16 autocast (eval.precision=bf16,
and what bf16-mixed training used to rank with) and tf32 (eval.precision=tf32: fp32 with TF32 matmuls). Prints,
against fp32, the share of users whose top-K list / top-K set differs, how far the same SID's beam score moves
against the gaps between neighbouring beams, and which ranking reproduces the run's own predictions.jsonl.
Where the device has no TF32 (a CPU, a GPU before Ampere) tf32 would be fp32 itself: there it is emulated, the
inputs of every matmul and attention product rounded to TF32's 10 mantissa bits, sums in fp32.
    python scripts/compare_eval_precision.py runs/finetune --users 200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from gti.rank.beam_search import constrained_beam_search
from gti.rank.trie import beams_to_items
from gti.train.recommender import ranking_precision
from gti.train.stage import load_finetuned


def to_tf32(x):
    """An fp32 tensor rounded to TF32 (10 mantissa bits, round to nearest even); anything else as it is."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & -8192  # the 13 dropped bits, rounded half to even
    return bits.view(torch.float32).view(x.shape)


class EmulatedTf32(torch.overrides.TorchFunctionMode):
    """Matmul, linear and attention inputs rounded to TF32 as tensor cores read them; products summed in fp32."""

    PAIRS = {torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.PAIRS:
            args = (to_tf32(args[0]), to_tf32(args[1]), *args[2:])
        elif func is torch.nn.functional.scaled_dot_product_attention:
            args = (*map(to_tf32, args[:3]), *args[3:])
        return func(*args, **(kwargs or {}))


def has_tf32(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def rank(model, tok, trie, loader, num_beams: int, precision: str, emulate: bool) -> tuple[list[list[int]], list[dict]]:
    """Per user: item ids best first, and {SID: score} of the returned beams. `emulate`: TF32 through EmulatedTf32."""
    items, scores = [], []
    for batch in tqdm(loader, desc=f"{precision} (emulated)" if emulate else precision):
        with ranking_precision(model, precision), EmulatedTf32() if emulate else contextlib.nullcontext():
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
    ap.add_argument("--precisions", nargs="+", default=["bf16", "tf32"], choices=["bf16", "tf32"], help="compared with fp32")
    args = ap.parse_args()

    run = load_finetuned(args.run_dir, args.users, args.batch_size)
    model, tok, trie, loader, cfg, test = run.model, run.tokenizer, run.trie, run.loader, run.cfg, run.test
    beams, k = cfg["eval"]["num_beams"], args.k
    emulated = "tf32" in args.precisions and not has_tf32(next(model.parameters()).device)
    ranked = {p: rank(model, tok, trie, loader, beams, p, emulated and p == "tf32") for p in ["fp32", *args.precisions]}
    items32, scores32 = ranked["fp32"]
    gaps = [x - y for a in scores32 for s in [sorted(a.values(), reverse=True)] for x, y in zip(s, s[1:])]
    hits = {p: sum(ex.target in its[:k] for ex, its in zip(test, items)) / len(test) for p, (items, _) in ranked.items()}
    print(f"{args.run_dir}: {len(test)} test users, beam {beams}, top-{k}" + ("; tf32 emulated" if emulated else ""))
    print(f"  gap between neighbouring fp32 beams: median {statistics.median(gaps):.3f} nats")
    print(f"  recall@{k}: " + ", ".join(f"{p} {h:.4f}" for p, h in hits.items()))
    for p in args.precisions:
        items, scores = ranked[p]
        lists = sum(a[:k] != b[:k] for a, b in zip(items32, items)) / len(test)
        sets = sum(set(a[:k]) != set(b[:k]) for a, b in zip(items32, items)) / len(test)
        moves = [abs(s - b[sid]) for a, b in zip(scores32, scores) for sid, s in a.items() if sid in b]
        print(f"  {p} against fp32: top-{k} list differs (order or items) for {lists:.1%} of users, set for {sets:.1%}; "
              f"the same SID's score moves by {statistics.mean(moves):.4f} nats on average, {max(moves):.4f} at most")  # fmt: skip
    # the run's own lists: a check that the prompts were rebuilt as gti.finetune built them
    rows = [json.loads(line) for line in (args.run_dir / "predictions.jsonl").read_text().splitlines()]
    saved = {r["index"]: r["items"][:k] for r in rows}
    same = {p: statistics.mean(saved[ex.index] == its[:k] for ex, its in zip(test, items) if ex.index in saved) for p, (items, _) in ranked.items()}  # fmt: skip
    print(f"  predictions.jsonl ({cfg['eval'].get('precision', 'trainer.precision')} ranking, "
          f"trainer.precision={cfg['trainer']['precision']}) equals the lists of " + ", ".join(f"{p} for {v:.1%}" for p, v in same.items()))  # fmt: skip


if __name__ == "__main__":
    main()
