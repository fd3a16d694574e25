"""The Trainer both stages build, its optimiser and schedule, thread and FSDP settings, the first-step report."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from gti import STARTED
from gti.core.config import TrainerConfig
from gti.core.log import get_logger
from gti.train.step import stop_if_diverged, unsharded


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup_steps: int, trainer=None) -> dict:
    """AdamW + linear warm-up, in Lightning's `configure_optimizers` format (stepped per batch); fused where
    `trainer` allows it (`fuses_adamw`)."""
    params = [p for p in params if p.requires_grad]
    fused = True if fuses_adamw(trainer, params) else None  # None, not False: torch's default (foreach on CUDA)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    warm = max(warmup_steps, 0)
    # not transformers' get_constant_schedule_with_warmup: its factor is s / warm, so the first step runs at LR 0;
    # ours is (s + 1) / warm, the first step already learns and step warm - 1 reaches the full LR
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fuses_adamw(trainer, params: list) -> bool:
    """Whether AdamW runs fused: one pass over each tensor (one kernel on CUDA), not ~10 elementwise ops per tensor.
    On this 2-core CPU an AdamW step over SmolLM2-135M's 272 tensors takes 143 ms fused against 747 ms as torch's
    default for-loop (scripts/bench_throughput.py prints both). Not under a GradScaler (fp16: a fused step
    unscales inside, after clipping would have needed the unscaled gradients) nor a sharding strategy (FSDP,
    DeepSpeed: their flat or sharded parameters keep torch's default)."""
    if trainer is None or getattr(trainer.precision_plugin, "scaler", None) is not None or not unsharded(trainer.strategy):
        return False
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def set_threads(t: TrainerConfig) -> None:
    """trainer.threads > 0: torch's CPU threads for this process (several runs sharing one machine: torch's
    default of one thread per core oversubscribes it)."""
    if t.threads > 0:
        torch.set_num_threads(t.threads)


def process_age() -> float:
    """Seconds since this process started: its start time in /proc/self/stat (field 22, clock ticks since boot)
    against /proc/uptime; without /proc, since `gti` was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # fields 3.. after "pid (comm)"
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - STARTED


_first_step_reported = False


def report_first_step(trainer) -> None:
    """One line per process at its first training batch: start-up cost (imports, data, model, compile set-up).
    scripts/ benchmarks parse this exact line."""
    global _first_step_reported
    if not _first_step_reported and trainer.is_global_zero:
        _first_step_reported = True
        # the "gti" logger itself: the line reads "[gti] first training step ..."
        get_logger("train").parent.info("first training step began after %.1fs", process_age())


def unshard(trainer, module) -> None:
    """After fit under FSDP each parameter is this rank's 1-D slice of a flat shard (use_orig_params): give every
    rank the full tensors back, so merging, diagnostics and saving see the plain model."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = trainer.strategy.model
    if not isinstance(wrapped, FSDP):
        return
    with FSDP.summon_full_params(wrapped, writeback=False):
        full = {id(p): p.detach().clone() for p in module.parameters()}  # shapes as built: (V, d), (n, d), ...
    for p in module.parameters():
        p.data = full[id(p)]


def clip_gradients(module, optimizer, clip_val, algorithm) -> None:
    """Lightning's FSDP precision refuses norm clipping; FSDP's own clip_grad_norm_ takes the norm over all shards.
    Its mixed-precision plugin refuses a fused optimizer; clipped here."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = module.trainer.strategy.model
    if clip_val and isinstance(wrapped, FSDP) and algorithm in (None, "norm"):
        wrapped.clip_grad_norm_(clip_val)
    elif clip_val and getattr(optimizer, "_step_supports_amp_scaling", False):
        # a fused AdamW (fuses_adamw: never under a GradScaler), which Lightning's mixed-precision plugin refuses to
        # clip for fear of scaled gradients; with no scaler they are the true ones, clipped as Lightning would
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        module.clip_gradients(optimizer, clip_val, algorithm)


def make_trainer(t: TrainerConfig, run_dir: Path, max_steps: int, callbacks: list | None = None, **kw):
    import lightning as L
    from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    set_threads(t)
    strategy = t.strategy
    if strategy == "auto" and (t.devices > 1 or t.num_nodes > 1):
        strategy = "ddp"  # multi-GPU is one line
    # checkpoints/last.ckpt at each epoch's end, and every checkpoint_every steps when > 0; -1: none at all (a
    # full fine-tune's is the model plus AdamW state, ~1.6 GB for SmolLM2, written even when nothing will resume)
    every = t.checkpoint_every if t.checkpoint_every > 0 else None
    ckpts = [] if t.checkpoint_every < 0 else [ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=every)]
    callbacks = callbacks or []
    # validation during fit: a fraction of each epoch, or every N training batches counted across epochs
    every_n = t.val_check_interval > 1
    val = dict(val_check_interval=int(t.val_check_interval), check_val_every_n_epoch=None) if every_n else dict(val_check_interval=t.val_check_interval)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_epochs=t.max_epochs if max_steps < 0 else None,
        max_steps=max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps,
        logger=CSVLogger(run_dir, name="logs"),  # logs/version_N: a resumed run keeps the earlier logs
        # no checkpoint holds weights trained on a NaN/inf loss (the step checks only at logging steps)
        callbacks=[
            *ckpts,
            LambdaCallback(on_save_checkpoint=lambda _t, module, _c: stop_if_diverged(module)),
            LambdaCallback(on_train_batch_start=lambda trainer, *_: report_first_step(trainer)),
            # the bar reads the logged loss with .item(), a device sync: every log_every_n_steps, not every step
            *([TQDMProgressBar(refresh_rate=max(t.log_every_n_steps, 1))] if kw.get("enable_progress_bar", True) else []),
            *callbacks,
        ],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in ckpts + callbacks),  # else Lightning adds one
        default_root_dir=run_dir,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **val,
        **kw,
    )


