"""Stage 2 `python -m gti.finetune [config.yaml] [key=value ...]` — next-item fine-tuning + evaluation.

`init_from=RUN_DIR` takes a gti.ground folder (tokenizer, SIDs, dataset come with it); without it
the base model is extended with `init=...` so baselines run through the same code. Evaluation is
trie-constrained beam search (design.md §7): Recall@K / NDCG@K from the target's rank among the
de-duplicated items of the returned beams, every example counted once, under DDP too.
Writes model/, metrics.json, predictions.jsonl, gti.json, config.yaml and logs/ into output_dir.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from gti.core.config import FinetuneConfig, eval_problems, load_config, to_yaml
from gti.core.errors import ConfigError

if TYPE_CHECKING:
    from gti.tokens.vocab import NewTokens


# ----------------------------------------------------------------------------------------- setup
def load_stage1(cfg: FinetuneConfig):
    """Model, tokenizer, dataset and new tokens from a gti.ground folder (validated first)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.core.io import file_sha256
    from gti.data.dataset import load_dataset
    from gti.tokens.vocab import NewTokens

    run = Path(cfg.init_from)
    problems = []
    if not (run / "gti.json").is_file():
        problems.append(f"init_from={run}: not a gti.ground output folder (no gti.json)")
    if not (run / "model" / "config.json").is_file():
        problems.append(f"init_from={run}: no model/ folder with config.json")
    if problems:
        raise ConfigError.listing(problems)
    meta = json.loads((run / "gti.json").read_text())
    if meta.get("stage") != "ground":
        raise ConfigError(f"init_from={run}: gti.json says stage={meta.get('stage')!r}, expected 'ground'")
    d = meta["dataset"]
    if (cfg.data.name, cfg.data.root) != (d["name"], d["root"]):
        print(f"[gti.finetune] dataset from {run}: {d['root']}/{d['name']} (overrides data.name={cfg.data.name})")
    cfg.data.name, cfg.data.root, cfg.model = d["name"], d["root"], meta["base_model"]
    ds = load_dataset(d["root"], d["name"], need_index=True)
    if file_sha256(ds.path("index")) != meta["sid_index"]["sha256"]:
        raise ConfigError(f"{ds.path('index')} changed since {run} was grounded; re-run gti.ground")
    from gti.data.slices import subset

    ds = subset(ds, cfg.data.max_users, cfg.data.max_items)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    nt = meta["new_tokens"]
    if len(tokenizer) != nt["start"] + nt["count"] or model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ConfigError(f"{run}/model: tokenizer size {len(tokenizer)} does not match gti.json / embedding rows")
    return model, tokenizer, ds, NewTokens(nt["tokens"], nt["start"], [[] for _ in nt["tokens"]]), meta


def apply_lora(model, cfg: FinetuneConfig, new: NewTokens):
    """LoRA adapters on the attention/MLP projections; the new rows train through the grounding overlay.

    Not peft's `modules_to_save=[embed_tokens, lm_head]`: that gives each its own full copy, so a tied
    model trains two drifting tables and merges untied (design.md §10). The overlay (gti/overlay.py)
    holds one (n, d) table of the new rows for a tied model, two for an untied one; old rows stay frozen.
    """
    from peft import LoraConfig, get_peft_model

    from gti.tokens.overlay import install_overlay

    rows = install_overlay(model, new.start, len(new))  # freezes the model, returns the new-row table(s)
    lc = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    model = get_peft_model(model, lc)  # leaves only lora_* parameters trainable ...
    for p in rows:
        p.requires_grad_(True)  # ... so the new rows are switched back on
    return model


def merge_lora(model):
    """The plain HF model: LoRA deltas merged into the projections, overlay rows into embedding / head."""
    from gti.tokens.overlay import merge_overlay

    model = model.merge_and_unload()
    merge_overlay(model)  # a tied model stays tied: the rows go into its one shared matrix
    return model


def baselines(ds, train_inter: dict, examples: list, ks: list[int], seed: int) -> dict:
    """Most-popular and random item lists scored by the same metric code."""
    import torch

    from gti.rank.metrics import RankingMetrics, popularity_ranking, random_ranking, rank_of

    out = {}
    k = max(ks)
    pop = popularity_ranking(train_inter, k)
    gen = torch.Generator().manual_seed(seed)
    for name in ("popularity", "random"):
        m = RankingMetrics(tuple(ks), sync_on_compute=False)  # computed on rank 0 only
        ranks = []
        for ex in examples:
            items = pop if name == "popularity" else random_ranking(ds.num_items, k, gen)
            ranks.append(rank_of(ex.target, items))
        m.update(torch.tensor([ex.index for ex in examples]), torch.tensor(ranks))
        out[name] = {k2: float(v) for k2, v in m.compute().items()}
    return out


def run(cfg: FinetuneConfig) -> Path:
    problems = eval_problems(cfg.eval)
    if problems:
        raise ConfigError.listing(problems)
    import lightning as L
    from torch.utils.data import DataLoader

    from gti.analysis.report import diagnose_rows, public
    from gti.core.io import write_json, write_jsonl
    from gti.core.runs import RunDir, run_metadata, save_hf, write_metadata
    from gti.data.dataset import leave_one_out
    from gti.indexing.ensure import ensure_dataset
    from gti.rank.trie import SidTrie
    from gti.tokens.extend import extend_model
    from gti.train.batching import training_loader
    from gti.train.recommender import RecommenderModule, check_prompt_lengths, gather_predictions
    from gti.train.rows import collate, eval_rows, rec_train_rows
    from gti.train.templates import PromptFormatter
    from gti.train.trainer import make_trainer, set_threads

    set_threads(cfg.trainer)  # before any work: row building and model loading use the threads too
    L.seed_everything(cfg.seed, workers=True)
    t0 = time.time()
    if cfg.init_from:
        model, tokenizer, ds, new, _ = load_stage1(cfg)
    else:
        ds = ensure_dataset(cfg.data, cfg.sids)
        model, tokenizer, new = extend_model(cfg.model, ds, cfg.init, cfg.init_options, None, cfg.seed)
    run_dir = RunDir(Path(cfg.output_dir))
    work = run_dir.start(cfg.resume, cfg)

    splits = leave_one_out(ds.inter, cfg.data.max_history, train=False)  # training rows: gti.train.rows, cached
    valid, test = splits["valid"], splits["test"]
    if cfg.eval.max_users > 0:
        valid, test = valid[: cfg.eval.max_users], test[: cfg.eval.max_users]
    fmt = PromptFormatter(tokenizer)
    check_prompt_lengths(ds, valid + test, fmt, cfg)
    rows = rec_train_rows(ds, fmt, cfg, new)  # with train_per_user / history_loss / multitask, see gti/rows.py
    items = sorted(ds.index)
    trie = SidTrie([tokenizer.convert_tokens_to_ids(ds.index[i]) for i in items], tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    train_loader, sampler, padding = training_loader(rows, pad, cfg.seed, cfg.optim.batch_size, cfg.trainer)
    prompts = partial(collate, pad_id=pad, left=True)  # longest prompts first (eval_rows)
    val_loader = DataLoader(eval_rows(ds, valid, fmt, cfg.templates[0]), batch_size=cfg.eval.batch_size, collate_fn=prompts)
    test_loader = DataLoader(eval_rows(ds, test, fmt, cfg.templates[0]), batch_size=cfg.eval.batch_size, collate_fn=prompts)

    if cfg.lora.enabled:
        model = apply_lora(model, cfg, new)
    module = RecommenderModule(model, tokenizer, trie, cfg, sampler=sampler)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"[gti.finetune] {len(ds.inter)} users, {ds.num_items} items, {len(rows)} training rows ({padding}), "
        f"{len(valid)} valid / {len(test)} test users, beam {cfg.eval.num_beams}, ranked in {cfg.eval.precision}\n"
        f"[gti.finetune] trainable parameters: {trainable:,}{' (LoRA)' if cfg.lora.enabled else ''}\n"
        f"[gti.finetune] example: {tokenizer.decode(rows[0]['input_ids'])!r}"
    )

    trainer = make_trainer(cfg.trainer, work, cfg.trainer.max_steps)
    trainer.fit(module, train_loader, val_loader if cfg.eval.valid else None, ckpt_path=run_dir.last_checkpoint(cfg.resume))
    val_result = trainer.validate(module, val_loader, verbose=False)[0] if cfg.eval.valid else {}
    trainer.test(module, test_loader, verbose=False)
    preds = gather_predictions(module.predictions)
    test_metrics = dict(module.test_metrics.compute())

    if not trainer.is_global_zero:
        return run_dir.final
    if cfg.lora.enabled:
        model = merge_lora(model)
    metrics = {
        "valid": {k.removeprefix("val/"): v for k, v in val_result.items()},
        "test": test_metrics,
        "baselines": {"test": baselines(ds, {u: s[:-2] for u, s in ds.inter.items()}, test, cfg.eval.ks, cfg.seed)},
        "eval_precision": cfg.eval.precision,  # ranking arithmetic (eval.precision), not trainer.precision
        "steps": trainer.global_step,
        "wall_time_s": round(time.time() - t0, 1),
    }
    diag = diagnose_rows(model, tokenizer, new, ds, work, "finetuned")
    write_json(work / "metrics.json", metrics)
    write_jsonl(work / "predictions.jsonl", sorted(preds, key=lambda p: p["index"]))
    save_hf(model, tokenizer, work / "model")
    write_metadata(work, run_metadata("finetune", cfg, ds, new, init_from=cfg.init_from, metrics=metrics, diagnostics=public(diag)))
    out = run_dir.finish()
    print("[gti.finetune] test: " + ", ".join(f"{k}={v:.4f}" for k, v in test_metrics.items() if "@" in k))
    print("[gti.finetune] popularity: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics["baselines"]["test"]["popularity"].items() if "@" in k))
    print(f"[gti.finetune] done in {time.time() - t0:.0f}s -> {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    from gti.core.cli import guarded

    cfg = guarded(lambda: load_config(FinetuneConfig, argv))
    print(to_yaml(cfg))
    guarded(lambda: run(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
