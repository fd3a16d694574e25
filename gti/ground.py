"""Stage 1 `python -m gti.ground [config.yaml] [key=value ...]` — GTI grounding (arXiv 2604.02324 §3).

Freeze the whole LM; train only the new token rows with next-token loss on paired text in both
directions (item text -> SID, SID -> item text). Writes a self-describing run folder:
  model/ (plain HF model + tokenizer)  gti.json  config.yaml  diagnostics*.json + PNGs  logs/
The config is parsed and checked before torch / lightning are imported, so mistakes fail fast.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gti.core.config import GroundConfig, load_config, to_yaml
from gti.core.errors import ConfigError


def validate(cfg: GroundConfig) -> None:
    from gti.train.templates import GROUNDING_TEMPLATES

    problems = [f"ground.templates: unknown template '{t}' (known: {', '.join(GROUNDING_TEMPLATES)})" for t in cfg.ground.templates if t not in GROUNDING_TEMPLATES]
    if cfg.tokens_file and not Path(cfg.tokens_file).is_file():
        problems.append(f"tokens_file: {cfg.tokens_file} not found")
    if cfg.optim.batch_size < 1 or cfg.max_length < 8:
        problems.append("optim.batch_size must be >= 1 and max_length >= 8")
    from gti.tokens.init_strategies import STRATEGIES

    if cfg.init not in STRATEGIES:
        problems.append(f"init: unknown strategy '{cfg.init}' (known: {', '.join(STRATEGIES)})")
    if problems:
        raise ConfigError.listing(problems)


def run(cfg: GroundConfig) -> Path:
    import lightning as L
    import torch

    from gti.analysis.report import diagnose_rows, public
    from gti.core.runs import RunDir, global_rank, run_metadata, save_hf, write_metadata
    from gti.indexing.ensure import ensure_dataset
    from gti.tokens.extend import extend_model
    from gti.tokens.overlay import merge_overlay, overlay_rows
    from gti.train.batching import training_loader
    from gti.train.grounding import GroundingModule
    from gti.train.rows import grounding_rows
    from gti.train.templates import PromptFormatter
    from gti.train.trainer import make_trainer, set_threads, unshard

    validate(cfg)
    set_threads(cfg.trainer)  # before any work: row building and model loading use the threads too
    L.seed_everything(cfg.seed, workers=True)
    run_dir = RunDir(Path(cfg.output_dir))
    work = run_dir.start(cfg.resume, cfg)
    t0 = time.time()

    # setup: data (+ SIDs) on demand, extended model with the chosen starting point
    ds = ensure_dataset(cfg.data, cfg.sids)
    model, tokenizer, new = extend_model(cfg.model, ds, cfg.init, cfg.init_options, cfg.tokens_file, cfg.seed)
    fmt = PromptFormatter(tokenizer)
    rows = grounding_rows(ds, new, fmt, cfg.ground.templates, cfg.max_length, "gti.ground")  # cached (gti/rows.py)
    loader, sampler, padding = training_loader(rows, tokenizer.pad_token_id, cfg.seed, cfg.optim.batch_size, cfg.trainer)
    old_rows = model.get_input_embeddings().weight.detach()[: new.start].clone()
    diag_init = diagnose_rows(model, tokenizer, new, ds, work, "init") if cfg.diagnostics and global_rank() == 0 else {}
    o = cfg.optim
    fast = dict(lean_step=cfg.trainer.lean_step, compile_step=cfg.trainer.compile)  # trainer.lean_step / trainer.compile
    module = GroundingModule(model, new, o.lr, o.weight_decay, o.warmup_steps, sampler=sampler, **fast)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    max_steps = cfg.trainer.max_steps
    print(
        f"[gti.ground] {len(new)} new tokens (ids {new.start}..{new.start + len(new) - 1}), init={cfg.init}\n"
        f"[gti.ground] {len(rows)} grounding examples x {cfg.trainer.max_epochs} epochs, batch {cfg.optim.batch_size}, "
        f"max_steps {max_steps}, {padding}\n[gti.ground] trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)\n"
        f"[gti.ground] example: {tokenizer.decode(rows[0]['input_ids'])!r}"
    )

    # fit
    trainer = make_trainer(cfg.trainer, work, max_steps)
    trainer.fit(module, loader, ckpt_path=run_dir.last_checkpoint(cfg.resume))
    unshard(trainer, module)  # FSDP: every rank gets the full weights back before reading the rows
    rows_in, rows_out = overlay_rows(model)
    merge_overlay(model)
    if cfg.ground.unfreeze_steps > 0:
        full = GroundingModule(model, new, cfg.ground.unfreeze_lr, o.weight_decay, 0, full=True, **fast)
        phase2 = make_trainer(cfg.trainer, work / "phase2", cfg.ground.unfreeze_steps)
        phase2.fit(full, loader)
        unshard(phase2, full)
    if cfg.ground.unfreeze_steps == 0 and not torch.equal(model.get_input_embeddings().weight.detach()[: new.start], old_rows):
        raise RuntimeError("old embedding rows changed during grounding")  # cannot happen: they are frozen

    # evaluate (diagnostics) + save
    if trainer.is_global_zero:
        diag = diagnose_rows(model, tokenizer, new, ds, work, "final", before=diag_init) if cfg.diagnostics else {}
        save_hf(model, tokenizer, work / "model")
        write_metadata(work, run_metadata(
            "ground", cfg, ds, new, trainable_parameters=trainable, grounding_examples=len(rows),
            steps=trainer.global_step, wall_time_s=round(time.time() - t0, 1),
            final_loss=_last_loss(trainer), diagnostics={"init": public(diag_init), "final": public(diag)} if cfg.diagnostics else {},
        ))  # fmt: skip
        out = run_dir.finish()
        print(f"[gti.ground] done in {time.time() - t0:.0f}s -> {out}")
        return out
    return run_dir.final


def _last_loss(trainer) -> float | None:
    loss = trainer.callback_metrics.get("train/loss")
    return None if loss is None else float(loss)


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import guarded

    cfg = guarded(lambda: load_config(GroundConfig, argv))
    print(to_yaml(cfg))
    guarded(lambda: run(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
