"""`python -m gti.sasrec [config.yaml] [key=value ...]` — the SASRec reference: an ID-based sequential recommender on the same split.

SASRec (Kang & McAuley 2018) with full-softmax cross-entropy (SASRec+, Klenitskiy & Vasilev 2023), trained on the
LM stages' dataset and leave-one-out split (last item test, second last valid, the rest trains), early-stopped on
validation `monitor` with the best epoch restored for test. Ranking scores every catalogue item, history items
included as in the LM stages, and is scored by the same Recall/NDCG code (docs/evaluation.md).
Writes model/ (config.json + model.safetensors), metrics.json, predictions.jsonl, gti.json, config.yaml and logs/.
resume=auto continues a killed run after its last finished epoch (checkpoints/last.ckpt in the .partial folder).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from gti.core.config import SasrecConfig
from gti.core.errors import ConfigError


def run(cfg: SasrecConfig) -> Path:
    from gti.train.sasrec import config_problems

    problems = config_problems(cfg)
    if problems:
        raise ConfigError.listing(problems)
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader

    from gti.core.config import to_dict
    from gti.core.io import file_sha256, write_json, write_jsonl
    from gti.core.runs import SCHEMA_VERSION, peak_memory_mb, versions, write_metadata
    from gti.data.dataset import leave_one_out
    from gti.train import trainer as trainers
    from gti.train.recommender import baselines, gather_predictions
    from gti.train.sasrec import (
        EpochCheckpoint,
        Padded,
        SasrecModel,
        SasrecModule,
        collate_train,
        eval_batches,
        load_data,
        save_model,
        target_positions,
        train_windows,
    )
    from gti.train.stage import Stage

    # setup
    stage = Stage("sasrec", cfg)  # threads, the one seeding call, the clock
    ds = load_data(cfg.data)
    work = stage.run_dir.start(cfg.resume, cfg)  # <output_dir>.partial/ with config.yaml, emptied unless resume=auto
    T = cfg.data.max_history
    splits = leave_one_out(ds.inter, 0, train=False)  # whole histories: the model reads the last T, `seen` all
    valid, test = splits["valid"], splits["test"]
    if cfg.eval.max_users > 0:
        valid, test = valid[: cfg.eval.max_users], test[: cfg.eval.max_users]
    windows = train_windows(ds.inter, T)
    if not windows:
        raise ConfigError(f"data.name={ds.name}: no user has 4 or more items, so there is nothing to train on")
    # padded once, not per batch: the model is so small that per-step Python padding took half of a GPU step
    train_loader = DataLoader(Padded(collate_train(windows, T)), batch_size=cfg.optim.batch_size, shuffle=True,
                              collate_fn=target_positions, num_workers=cfg.trainer.num_workers)  # fmt: skip

    val_loader, test_loader = (DataLoader(eval_batches(x, T, cfg.eval.batch_size), batch_size=None) for x in (valid, test))
    model = SasrecModel(ds.num_items, cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout, T)
    module = SasrecModule(model, cfg)
    stage.say(
        f"{len(ds.inter)} users, {ds.num_items} items, {len(windows)} training windows of <= {T + 1} items "
        f"({sum(len(w) - 1 for w in windows)} targets), {len(valid)} valid / {len(test)} test users, ranked over all items",
        f"parameters: {sum(p.numel() for p in model.parameters()):,} (hidden {cfg.hidden}, {cfg.blocks} blocks, "
        f"{cfg.heads} heads); up to {cfg.trainer.max_epochs} epochs, early stop after {cfg.patience} without a better valid {cfg.monitor}",
    )

    # fit: early stopping on the validation metric, its best epoch kept as checkpoints/best.ckpt
    callbacks = [EpochCheckpoint(work / "checkpoints" / "last.ckpt")]  # what resume=auto continues from
    if cfg.eval.valid:
        best = ModelCheckpoint(dirpath=work / "checkpoints", filename="best", monitor=f"val/{cfg.monitor}", mode="max", save_top_k=1)
        callbacks += [best, EarlyStopping(monitor=f"val/{cfg.monitor}", mode="max", patience=cfg.patience)]
    t = cfg.trainer
    # EpochCheckpoint is the last.ckpt resume=auto reads; the generic one (trainer.checkpoint_every) would add a
    # second copy, last-v1.ckpt, when the fit ends
    trainer = trainers.make_trainer(replace(t, checkpoint_every=-1), work, t.max_steps, callbacks)
    last = stage.run_dir.last_checkpoint(cfg.resume)  # written at the end of every epoch
    if last:
        stage.say(f"resuming after the last finished epoch: {last}")
    trainer.fit(module, train_loader, val_loader if cfg.eval.valid else None, ckpt_path=last)

    # evaluate the best epoch (the last one without validation)
    restore = best.best_model_path if cfg.eval.valid else None
    val_result = trainer.validate(module, val_loader, ckpt_path=restore, verbose=False)[0] if cfg.eval.valid else {}
    trainer.test(module, test_loader, ckpt_path=restore, verbose=False)
    preds = gather_predictions(module.predictions)
    test_metrics, test_unseen = dict(module.test_metrics.compute()), dict(module.test_unseen.compute())

    # save (rank 0)
    if not trainer.is_global_zero:
        return stage.final
    history = module.history
    best_epoch = max(history, key=lambda h: h[cfg.monitor])["epoch"] if cfg.eval.valid and history else trainer.current_epoch
    metrics = {
        "valid": {k.removeprefix("val/"): v for k, v in val_result.items() if k.startswith("val/")},
        "test": test_metrics,
        # the same ranking with the user's history removed (the target kept), as published SASRec figures are
        "valid_unseen": {k.removeprefix("val_unseen/"): v for k, v in val_result.items() if k.startswith("val_unseen/")},
        "test_unseen": test_unseen,
        "baselines": {"test": baselines(ds, {u: s[:-2] for u, s in ds.inter.items()}, test, cfg.eval.ks, cfg.seed)},
        "ranking": "full catalogue",  # every item scored, history items included (as the LM stages' beams may return them)
        "epochs": trainer.current_epoch,  # epochs trained (early stopping may end before trainer.max_epochs)
        "best_epoch": best_epoch,  # 1-based: the epoch whose weights were tested and saved
        "steps": trainer.global_step,
        "wall_time_s": stage.elapsed(),
        "history": history,  # per epoch: mean training loss and validation metrics
    }
    write_json(work / "metrics.json", metrics)
    write_jsonl(work / "predictions.jsonl", sorted(preds, key=lambda p: p["index"]))
    save_model(model, work / "model")  # the restored best weights (trainer.test loaded them into `model`)
    write_metadata(work, {
        "schema_version": SCHEMA_VERSION,
        "stage": "sasrec",
        "dataset": {"name": ds.name, "root": str(ds.root), "inter_sha256": file_sha256(ds.path("inter"))},
        "seed": cfg.seed,
        "versions": versions(),
        "config": to_dict(cfg),
        "cost": peak_memory_mb(),
        "metrics": metrics,
    })  # fmt: skip
    out = stage.run_dir.finish()
    pop = metrics["baselines"]["test"]["popularity"]
    stage.say(
        "test: " + ", ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if "@" in k) + f" (best epoch {best_epoch} of {metrics['epochs']})",
        "test with the history removed (as published figures): " + ", ".join(f"{k}={v:.4f}" for k, v in test_unseen.items() if "@" in k),
        "popularity: " + ", ".join(f"{k}={v:.4f}" for k, v in pop.items() if "@" in k),
        f"done in {stage.elapsed():.0f}s -> {out}",
    )
    return out


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import run_command

    run_command(argv, __doc__, SasrecConfig, run, log_as="sasrec")


if __name__ == "__main__":
    main(sys.argv[1:])
