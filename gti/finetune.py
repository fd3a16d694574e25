"""`python -m gti.finetune [config.yaml] [key=value ...]` — stage 2, next-item fine-tuning + evaluation.

`init_from=RUN_DIR` takes a gti.ground folder (tokenizer, SIDs, dataset come with it); without it
the base model is extended with `init=...` so baselines run through the same code. Evaluation is
trie-constrained beam search, or exact ranking (eval.ranking; docs/evaluation.md): Recall@K / NDCG@K from
the target's rank among the de-duplicated items of the returned SIDs, every example counted once, under DDP too.
Writes model/, metrics.json, predictions.jsonl, gti.json, config.yaml and logs/ into output_dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gti.core.checks import eval_problems, trainer_problems
from gti.core.config import FinetuneConfig
from gti.core.errors import ConfigError


def run(cfg: FinetuneConfig) -> Path:
    from gti.tokens.init_strategies import init_problems
    from gti.train.templates import REC_TEMPLATES

    problems = eval_problems(cfg.eval) + trainer_problems(cfg.trainer) + ([] if cfg.init_from else init_problems(cfg.init, cfg.init_options))
    if not cfg.templates or not all(0 <= t < len(REC_TEMPLATES) for t in cfg.templates):
        problems.append(f"templates={list(cfg.templates)}: one or more indices of the {len(REC_TEMPLATES)} rec templates (0..{len(REC_TEMPLATES) - 1})")
    if problems:
        raise ConfigError.listing(problems)

    from gti.analysis.snapshot import diagnose_rows, public, start_rows
    from gti.core.io import write_json, write_jsonl
    from gti.data.dataset import leave_one_out
    from gti.indexing.ensure import ensure_dataset
    from gti.rank.metrics import versus_popularity
    from gti.rank.trie import SidTrie
    from gti.tokens.extend import extend_model
    from gti.train.lora import apply_lora, merge_lora
    from gti.train.recommender import (
        RecommenderModule,
        baselines,
        beam_vs_exact,
        check_prompt_lengths,
        gather_predictions,
    )
    from gti.train.rows import eval_rows, prompt_loader, rec_train_rows
    from gti.train.stage import Stage, load_stage1, run_metadata
    from gti.train.templates import PromptFormatter

    stage = Stage("finetune", cfg)
    if cfg.init_from:
        model, tokenizer, ds, new, stage1 = load_stage1(cfg)
        init = stage1["init"]  # the grounded rows' starting point; cfg.init is not used with init_from
    else:
        ds = ensure_dataset(cfg.data, cfg.sids)
        model, tokenizer, new = extend_model(cfg.model, ds, cfg.init, cfg.init_options, None, cfg.seed)
        init = cfg.init
    work = stage.start()

    splits = leave_one_out(ds.inter, cfg.data.max_history, train=False)  # training rows: gti.train.rows, cached
    valid, test = splits["valid"], splits["test"]
    if cfg.eval.max_users > 0:
        valid, test = valid[: cfg.eval.max_users], test[: cfg.eval.max_users]
    fmt = PromptFormatter(tokenizer)
    check_prompt_lengths(ds, valid + test, fmt, cfg)
    rows = rec_train_rows(ds, fmt, cfg, new)  # with train_per_user / history_loss / multitask, see gti.train.rows
    items = sorted(ds.index)
    trie = SidTrie([tokenizer.convert_tokens_to_ids(ds.index[i]) for i in items], tokenizer.eos_token_id)
    train_loader, padding = stage.training_loader(rows, tokenizer.pad_token_id)
    def prompts(users):  # longest prompts first (eval_rows)
        return prompt_loader(eval_rows(ds, users, fmt, cfg.templates[0]), tokenizer.pad_token_id, cfg.eval.batch_size)

    val_loader, test_loader = prompts(valid), prompts(test)

    start = start_rows(model, new)  # how far fine-tuning moves the rows (diagnostics "moved")
    if cfg.lora.enabled:
        model = apply_lora(model, cfg, new)
    module = RecommenderModule(model, tokenizer, trie, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ranked = f"beam {cfg.eval.num_beams}" if cfg.eval.ranking == "beam" else "exact ranking of every item"
    stage.say(
        f"{len(ds.inter)} users, {ds.num_items} items, {len(rows)} training rows ({padding}), "
        f"{len(valid)} valid / {len(test)} test users, {ranked}, ranked in {cfg.eval.precision}",
        f"trainable parameters: {trainable:,}{' (LoRA)' if cfg.lora.enabled else ''}",
        f"example: {tokenizer.decode(rows[0]['input_ids'])!r}",
    )

    # fit, evaluate
    trainer = stage.fit(module, train_loader, val_loader if cfg.eval.valid else None)
    val_result = trainer.validate(module, val_loader, verbose=False)[0] if cfg.eval.valid else {}
    trainer.test(module, test_loader, verbose=False)
    preds = gather_predictions(module.predictions)
    test_metrics = dict(module.test_metrics.compute())
    check = {}
    if cfg.eval.exact_check_users > 0:  # every rank ranks (an FSDP forward needs them all); rank 0 records it
        users = test[: cfg.eval.exact_check_users]
        stage.say(f"beam vs exact ranking on {len(users)} test users ...")
        check = {"beam_vs_exact": beam_vs_exact(module.model, tokenizer, trie, prompts(users), cfg.eval)}
        stage.say(f"beam vs exact: {check['beam_vs_exact']}")

    # save (rank 0)
    if not trainer.is_global_zero:
        return stage.final
    if cfg.lora.enabled:
        model = merge_lora(model)
    metrics = {
        "valid": {k.removeprefix("val/"): v for k, v in val_result.items()},
        "test": test_metrics,
        "baselines": {"test": baselines(ds, {u: s[:-2] for u, s in ds.inter.items()}, test, cfg.eval.ks, cfg.seed)},
        "eval_precision": cfg.eval.precision,  # ranking arithmetic (eval.precision), not trainer.precision
        "ranking": cfg.eval.ranking,
        **check,
        "steps": trainer.global_step,
        "wall_time_s": stage.elapsed(),
    }
    diag = diagnose_rows(model, tokenizer, new, ds, work, "finetuned", before=start)
    write_json(work / "metrics.json", metrics)
    write_jsonl(work / "predictions.jsonl", sorted(preds, key=lambda p: p["index"]))
    meta = run_metadata("finetune", cfg, ds, new, init=init, init_from=cfg.init_from, metrics=metrics, diagnostics=public(diag))
    return stage.finish(model, tokenizer, meta, report=(
        "test: " + ", ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if "@" in k),
        "popularity: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics["baselines"]["test"]["popularity"].items() if "@" in k),
        versus_popularity(test_metrics, metrics["baselines"]["test"]["popularity"], cfg.eval.ks),
    ))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import run_command

    run_command(argv, __doc__, FinetuneConfig, run, log_as="finetune")


if __name__ == "__main__":
    main(sys.argv[1:])
