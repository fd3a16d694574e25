"""Grounding step (only the new rows train) vs full fine-tuning step, same model and batch.

Each variant runs in its own subprocess so peak memory (ru_maxrss) is its own. Prints time per
step, peak RSS, trainable state (parameters + AdamW moments + gradients) and the ratios.
    python scripts/bench_grounding.py                       # SmolLM2-135M, batch 8 x 64 tokens
    python scripts/bench_grounding.py --model tiny --steps 20
Targets: time ratio <= 0.7x, trainable state <= 1% of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(args) -> None:
    import torch

    from gti.tokens.overlay import install_overlay
    from gti.tokens.vocab import add_tokens, resize

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.model == "tiny":
        from transformers import AutoTokenizer

        from gti.core.assets import resolve_model
        from gti.testing import make_tiny_llama

        tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
        model = make_tiny_llama(len(tok))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gti.core.assets import resolve_model

        path = resolve_model(args.model)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokens = [f"<{chr(97 + lv)}_{c}>" for lv in range(4) for c in range(args.codes)]
    new = add_tokens(tok, tokens, [["x"]] * len(tokens))
    resize(model, tok)
    model.train()
    if args.variant == "ground":
        params = install_overlay(model, new.start, len(new))
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (args.batch, args.seq), generator=g)
    ids[:, -4:] = torch.randint(new.start, new.start + len(new), (args.batch, 4), generator=g)
    times = []
    for step in range(args.steps + 2):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t)
    n_train = sum(p.numel() for p in params)
    state_bytes = n_train * 4 * 4  # fp32 weights + grad + two AdamW moments
    print(json.dumps({
        "variant": args.variant, "step_s": sorted(times)[len(times) // 2], "trainable": n_train,
        "trainable_state_mb": state_bytes / 2**20, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, an HF id or a folder")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--codes", type=int, default=64, help="codes per level (4 levels of new tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", choices=["ground", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    results = {}
    for variant in ("ground", "full"):
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={v}" for k, v in vars(args).items() if k != "variant"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    g, f = results["ground"], results["full"]
    print(f"model={args.model} batch={args.batch} seq={args.seq} new_tokens={4 * args.codes} threads={args.threads}")
    print(f"{'variant':8} {'step (s)':>9} {'peak RSS (MB)':>14} {'trainable':>12} {'train state (MB)':>17}")
    for r in (g, f):
        print(f"{r['variant']:8} {r['step_s']:9.3f} {r['peak_rss_mb']:14.0f} {r['trainable']:12,} {r['trainable_state_mb']:17.2f}")
    print(f"ratio ground/full: time {g['step_s'] / f['step_s']:.2f}x, peak RSS {g['peak_rss_mb'] / f['peak_rss_mb']:.2f}x, "
          f"trainable state {100 * g['trainable_state_mb'] / f['trainable_state_mb']:.3f}%")  # fmt: skip


if __name__ == "__main__":
    main()
