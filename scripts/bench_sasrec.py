"""SASRec reference: where an epoch's host time goes, the per-batch Python padding it had against the padded-once path.

Measured side by side in one run on the dataset's real windows (ML-1M by default, `python -m gti.prepare` first):
  1. training data per epoch: a shuffled epoch of batches collated per batch from the window lists (before) against
     the loader the stage now uses (`Padded` + `target_positions`: one index per column); both give the same batches;
  2. validation data per epoch: collate_eval per batch (eval_batches, before) against iterating them collated once;
  3. for scale, one training step (forward, backward, Adam) on `--device` at the stage's batch size, ms.
On a GPU the step is a few milliseconds, so (1) and (2) were most of an epoch; on this CPU the step dominates.
    python scripts/bench_sasrec.py                  # ML-1M, batch 128, sequences of 200 (configs/sasrec.yaml)
    python scripts/bench_sasrec.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from gti.core.config import DataConfig, SasrecConfig
from gti.data.dataset import leave_one_out
from gti.train.sasrec import (
    Padded,
    SasrecModel,
    SasrecModule,
    collate_train,
    eval_batches,
    load_data,
    target_positions,
    train_windows,
)


def seconds(fn, repeats: int) -> float:
    """The best of `repeats` timings of fn(): the least disturbed by other work on a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="ml-1m")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval-batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()

    ds = load_data(DataConfig(name=a.dataset))
    windows, T, b = train_windows(ds.inter, a.max_len), a.max_len, a.batch
    valid = leave_one_out(ds.inter, 0, train=False)["valid"]
    print(f"{a.dataset}: {len(windows)} training windows of <= {T + 1} items, {len(valid)} valid users, batch {b}")

    def per_batch():  # what the stage did: a shuffled epoch, each batch padded from Python lists
        order = torch.randperm(len(windows)).tolist()
        for i in range(0, len(order), b):
            collate_train([windows[j] for j in order[i : i + b]], T)

    loader = DataLoader(Padded(collate_train(windows, T)), batch_size=b, shuffle=True, collate_fn=target_positions)
    before, after = seconds(per_batch, a.repeats), seconds(lambda: [None for _ in loader], a.repeats)
    print(f"training data per epoch:   per batch {before * 1e3:8.1f} ms   padded once {after * 1e3:7.1f} ms   ({before / after:.0f}x)")

    val = DataLoader(eval_batches(valid, T, a.eval_batch), batch_size=None)
    before = seconds(lambda: eval_batches(valid, T, a.eval_batch), a.repeats)  # what the stage did every epoch
    after = seconds(lambda: [None for _ in val], a.repeats)
    print(f"validation data per epoch: per batch {before * 1e3:8.1f} ms   collated once {after * 1e3:5.1f} ms")

    cfg = SasrecConfig()
    module = SasrecModule(SasrecModel(ds.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout, T), cfg).to(a.device)
    opt = module.configure_optimizers()
    batch = {k: v.to(a.device) for k, v in next(iter(loader)).items()}

    def step():
        opt.zero_grad()
        module.loss(batch).backward()
        opt.step()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up
    print(f"one training step on {a.device}: {seconds(step, a.repeats) * 1e3:.1f} ms ({len(loader)} steps an epoch)")


if __name__ == "__main__":
    main()
