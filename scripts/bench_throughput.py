"""Tokens/s of the grounding and fine-tuning steps as the stages run them, lean vs today's full-logits step.

Measured (issue 16, this script so far): each stage's LightningModule + `make_trainer` Trainer on real
ML-100K rows (`grounding_examples`, `train_rows`), `trainer.lean_step` true vs false, in fp32 and bf16
autocast. The variants alternate step by step in one fit (lean, full, full, lean, ...), so a shared CPU
slows both alike. Tokens are the real (unpadded) tokens.
Not measured yet (issue 16 asks for them too): a raw PyTorch twin loop, ranking users/s, time to first step.
    python scripts/bench_throughput.py                    # SmolLM2-135M, ground 16 x 64, finetune 8 x 96
    python scripts/bench_throughput.py --steps 2 --precision 32-true   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import random
import tempfile
import time
from pathlib import Path

import torch


class AlternatingTimer:
    """Lightning callback hooks: flips `module.lean_step` every step (lean, full, full, lean, ...) and
    sums wall time and real tokens per variant after `warmup` steps, so a shared CPU slows both alike."""

    def __init__(self, warmup: int):
        self.warmup, self.t0 = warmup, 0.0
        self.seconds, self.tokens = {True: 0.0, False: 0.0}, {True: 0, False: 0}

    def sync(self, module) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        module.lean_step = (batch_idx - self.warmup) % 4 in (0, 3)  # ABBA after warm-up: each variant as often first
        self.sync(module)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.sync(module)
        if batch_idx >= self.warmup:
            self.seconds[module.lean_step] += time.perf_counter() - self.t0
            self.tokens[module.lean_step] += int(batch["attention_mask"].sum())


def batches(rows: list, batch_size: int, n: int, pad_id: int, seed: int = 0) -> list[dict]:
    from gti.templates import pad_batch

    picked = random.Random(seed).sample(rows, batch_size * n)
    return [pad_batch(picked[i * batch_size : (i + 1) * batch_size], pad_id) for i in range(n)]


def tokens_per_s(module, data: list[dict], precision: str, accelerator: str, warmup: int) -> dict[bool, float]:
    from lightning.pytorch.callbacks import LambdaCallback

    from gti.config import TrainerConfig
    from gti.setup import make_trainer

    timer = AlternatingTimer(warmup)
    hooks = LambdaCallback(on_train_batch_start=timer.on_train_batch_start, on_train_batch_end=timer.on_train_batch_end)
    cfg = TrainerConfig(max_steps=len(data), accelerator=accelerator, precision=precision)
    with tempfile.TemporaryDirectory() as tmp:  # the stages' Trainer; no progress bar in this table
        trainer = make_trainer(cfg, Path(tmp), len(data), callbacks=[hooks], enable_progress_bar=False)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return {lean: timer.tokens[lean] / timer.seconds[lean] for lean in (True, False)}


def build(args):
    """SmolLM2 extended with ML-100K's SID tokens, its grounding rows and fine-tuning rows."""
    from gti.config import DataConfig, FinetuneConfig, GroundStageConfig
    from gti.data import last_per_user, leave_one_out, load_dataset
    from gti.grounding import grounding_examples
    from gti.recommender import train_rows
    from gti.setup import extend_model, subset
    from gti.templates import PromptFormatter

    ds = subset(load_dataset(args.data_root, args.dataset, need_index=True), 0, 0)
    model, tok, new = extend_model(args.model, ds, "mean", {}, None, 0)
    fmt = PromptFormatter(tok)
    ground_rows = grounding_examples(ds, new, fmt, GroundStageConfig().templates, args.ground_len, stage="bench")
    ft = FinetuneConfig(data=DataConfig(max_history=args.history), max_length=args.finetune_len)
    train = last_per_user(leave_one_out(ds.inter, ft.data.max_history)["train"], 1)
    ft_rows = train_rows(ds, train, fmt, ft, new)
    return model, tok, new, ft, ground_rows, ft_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--ground-batch", type=int, default=16)
    ap.add_argument("--ground-len", type=int, default=64)
    ap.add_argument("--finetune-batch", type=int, default=8)
    ap.add_argument("--finetune-len", type=int, default=96)
    ap.add_argument(
        "--history", type=int, default=10, help="items of history in a fine-tuning row (fits --finetune-len)"
    )
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (lean and full alternate)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--threads", type=int, default=0, help=">0: torch.set_num_threads")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from gti.grounding import GroundingModule
    from gti.recommender import RecommenderModule

    model, tok, new, ft_cfg, ground_rows, ft_rows = build(args)
    n = args.warmup + 2 * args.steps
    ground_data = batches(ground_rows, args.ground_batch, n, tok.pad_token_id)
    ft_data = batches(ft_rows, args.finetune_batch, n, tok.pad_token_id)
    ft_module = RecommenderModule(copy.deepcopy(model), tok, None, ft_cfg)  # full fine-tuning
    ground_module = GroundingModule(model, new, lr=1e-3, weight_decay=0.0, warmup_steps=0)  # overlay installed
    cells = [("ground", ground_module, ground_data), ("finetune", ft_module, ft_data)]

    speed = {}
    for precision in args.precision:
        for stage, module, data in cells:
            speed[(stage, precision)] = tps = tokens_per_s(module, data, precision, args.accelerator, args.warmup)
            print(f"[bench] {stage} {precision}: lean {tps[True]:.0f}, full {tps[False]:.0f} tokens/s", flush=True)

    gpu = torch.cuda.is_available()
    device = f"cuda ({torch.cuda.get_device_name()})" if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nmodel={args.model} on {device}; ground {args.ground_batch} x {args.ground_len}, "
          f"finetune {args.finetune_batch} x {args.finetune_len}; {args.steps} steps per variant, alternating")  # fmt: skip
    print(f"{'stage':9} {'precision':11} {'lean tok/s':>11} {'full tok/s':>11} {'lean/full':>10}")
    for (stage, precision), tps in speed.items():
        print(f"{stage:9} {precision:11} {tps[True]:11.0f} {tps[False]:11.0f} {tps[True] / tps[False]:9.2f}x")
    print("measured: the stages' step (LightningModule + make_trainer Trainer), lean vs full-logits.")
    print("not measured here yet: raw PyTorch twin loop, ranking users/s, time to first step (issue 16)")


if __name__ == "__main__":
    main()
