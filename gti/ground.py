"""`python -m gti.ground [config.yaml] [key=value ...]` — stage 1, GTI grounding of the new SID tokens.

GTI (arXiv 2604.02324 §3): freeze the whole LM; train only the new token rows with next-token loss on
paired text in both directions (item text -> SID, SID -> item text). Writes a self-describing run folder:
  model/ (plain HF model + tokenizer)  gti.json  config.yaml  diagnostics*.json + PNGs  logs/
The config is parsed and checked before torch / lightning are imported, so mistakes fail fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gti.core.checks import trainer_problems
from gti.core.config import GroundConfig
from gti.core.errors import ConfigError


def validate(cfg: GroundConfig) -> None:
    from gti.train.templates import GROUNDING_TEMPLATES

    problems = [f"ground.templates: unknown template '{t}' (known: {', '.join(GROUNDING_TEMPLATES)})" for t in cfg.ground.templates if t not in GROUNDING_TEMPLATES]
    if cfg.tokens_file and not Path(cfg.tokens_file).is_file():
        problems.append(f"tokens_file: {cfg.tokens_file} not found")
    if cfg.optim.batch_size < 1 or cfg.max_length < 8:
        problems.append("optim.batch_size must be >= 1 and max_length >= 8")
    from gti.tokens.init_strategies import init_problems

    problems += init_problems(cfg.init, cfg.init_options) + trainer_problems(cfg.trainer)
    if problems:
        raise ConfigError.listing(problems)


def run(cfg: GroundConfig) -> Path:
    import torch

    from gti.analysis.snapshot import diagnose_rows, public
    from gti.core.runs import global_rank
    from gti.indexing.ensure import ensure_dataset
    from gti.tokens.extend import extend_model
    from gti.tokens.overlay import merge_overlay, overlay_rows
    from gti.train import trainer as trainers
    from gti.train.grounding import GroundingModule
    from gti.train.rows import grounding_rows
    from gti.train.stage import Stage, run_metadata
    from gti.train.step import compile_mode
    from gti.train.templates import PromptFormatter

    validate(cfg)
    stage = Stage("ground", cfg)
    work = stage.start()

    # setup: data (+ SIDs) on demand, extended model with the chosen starting point
    ds = ensure_dataset(cfg.data, cfg.sids)
    model, tokenizer, new = extend_model(cfg.model, ds, cfg.init, cfg.init_options, cfg.tokens_file, cfg.seed)
    fmt = PromptFormatter(tokenizer)
    rows = grounding_rows(ds, new, fmt, cfg.ground.templates, cfg.max_length, "gti.ground")  # cached (gti.train.rows)
    loader, padding = stage.training_loader(rows, tokenizer.pad_token_id)
    old_rows = model.get_input_embeddings().weight.detach()[: new.start].clone()
    diag_init = diagnose_rows(model, tokenizer, new, ds, work, "init") if cfg.diagnostics and global_rank() == 0 else {}
    o = cfg.optim
    fast = dict(lean_step=cfg.trainer.lean_step, compile_mode=compile_mode(cfg.trainer))  # trainer.lean_step / .compile / .compile_mode
    module = GroundingModule(model, new, o.lr, o.weight_decay, o.warmup_steps, **fast)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    stage.say(
        f"{len(new)} new tokens (ids {new.start}..{new.start + len(new) - 1}), init={cfg.init}",
        f"{len(rows)} grounding examples x {cfg.trainer.max_epochs} epochs, batch {cfg.optim.batch_size}, "
        f"max_steps {cfg.trainer.max_steps}, {padding}",
        f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%)",
        f"example: {tokenizer.decode(rows[0]['input_ids'])!r}",
    )

    # fit
    trainer = stage.fit(module, loader)
    trainers.unshard(trainer, module)  # FSDP: every rank gets the full weights back before reading the rows
    overlay_rows(model)  # the trained (n, d) table(s) as merged next (test_fsdp records them here)
    merge_overlay(model)
    if cfg.ground.unfreeze_steps > 0:  # optional second phase: everything trains, from the merged model
        full = GroundingModule(model, new, cfg.ground.unfreeze_lr, o.weight_decay, 0, full=True, **fast)
        phase2 = trainers.make_trainer(cfg.trainer, work / "phase2", cfg.ground.unfreeze_steps)
        phase2.fit(full, loader)
        trainers.unshard(phase2, full)
    if cfg.ground.unfreeze_steps == 0 and not torch.equal(model.get_input_embeddings().weight.detach()[: new.start], old_rows):
        raise RuntimeError("old embedding rows changed during grounding")  # cannot happen: they are frozen

    # evaluate (diagnostics) + save
    if not trainer.is_global_zero:
        return stage.final
    diag = diagnose_rows(model, tokenizer, new, ds, work, "final", before=diag_init) if cfg.diagnostics else {}
    return stage.finish(model, tokenizer, run_metadata(
        "ground", cfg, ds, new, trainable_parameters=trainable, grounding_examples=len(rows),
        steps=trainer.global_step, wall_time_s=stage.elapsed(),
        final_loss=_last_loss(trainer), diagnostics={"init": public(diag_init), "final": public(diag)} if cfg.diagnostics else {},
    ))  # fmt: skip


def _last_loss(trainer) -> float | None:
    loss = trainer.callback_metrics.get("train/loss")
    return None if loss is None else float(loss)


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import run_command

    run_command(argv, __doc__, GroundConfig, run, log_as="ground")


if __name__ == "__main__":
    main(sys.argv[1:])
