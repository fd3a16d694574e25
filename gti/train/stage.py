"""The skeleton both training stages share, step by step; `gti.ground.run` and `gti.finetune.run` call it in order:

    stage = Stage("ground", cfg)                  # trainer.threads, the one seeding call, the clock
    work = stage.start()                          # <output_dir>.partial/ with config.yaml (docs/pipeline.md)
    loader, padding = stage.training_loader(rows, pad_id)   # the resumable shuffle, grouped by length
    trainer = stage.fit(module, loader)           # continues from the last checkpoint under resume=auto
    return stage.finish(model, tokenizer, meta)   # rank 0: model/ + gti.json, the folder renamed into place

What a stage builds (model, rows, LightningModule) and evaluates stays in its command module. `load_stage1` is
how stage 2 starts from a stage-1 folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gti.core.config import to_dict
from gti.core.errors import ConfigError
from gti.core.io import file_sha256
from gti.core.log import get_logger, quiet_other_ranks
from gti.core.runs import SCHEMA_VERSION, RunDir, peak_memory_mb, read_run, save_hf, versions, write_metadata


class Stage:
    def __init__(self, name: str, cfg):
        import lightning as L

        from gti.train.trainer import set_threads

        self.cfg, self.log = cfg, get_logger(name)  # lines read [gti.<name>] ..., printed by rank 0 only
        quiet_other_ranks()
        set_threads(cfg.trainer)  # before any work: row building and model loading use the threads too
        L.seed_everything(cfg.seed, workers=True)
        self.run_dir = RunDir(Path(cfg.output_dir))
        self.work = self.run_dir.work
        self.t0 = time.time()

    def start(self) -> Path:
        """The run folder `<output_dir>.partial/` (emptied unless resume=auto), with the resolved config.yaml."""
        self.work = self.run_dir.start(self.cfg.resume, self.cfg)
        return self.work

    def say(self, *lines: str) -> None:
        for line in lines:
            self.log.info(line)

    def elapsed(self) -> float:
        return round(time.time() - self.t0, 1)

    def training_loader(self, rows, pad_id: int) -> tuple:
        """(loader, the start-up line on padding): see gti.train.batching.training_loader."""
        from gti.train.batching import training_loader

        return training_loader(rows, pad_id, self.cfg.seed, self.cfg.optim.batch_size, self.cfg.trainer)

    def fit(self, module, train_loader, val_loader=None):
        """The stage's Trainer (gti.train.trainer.make_trainer) fitted; under resume=auto it continues from
        checkpoints/last.ckpt when there is one, mid-epoch included (gti.train.batching.ResumableLoader)."""
        from gti.train import trainer as trainers  # looked up at call time: tests wrap make_trainer

        t = self.cfg.trainer
        trainer = trainers.make_trainer(t, self.work, t.max_steps)
        trainer.fit(module, train_loader, val_loader, ckpt_path=self.run_dir.last_checkpoint(self.cfg.resume))
        return trainer

    def finish(self, model, tokenizer, meta: dict, report: tuple[str, ...] = ()) -> Path:
        """Rank 0 only: the model and gti.json written, the folder renamed to output_dir, `report` and the time logged."""
        save_hf(model, tokenizer, self.work / "model")
        write_metadata(self.work, meta)
        out = self.run_dir.finish()
        self.say(*report, f"done in {time.time() - self.t0:.0f}s -> {out}")
        return out

    @property
    def final(self) -> Path:
        """Where the finished run will be: what every rank but 0 returns."""
        return self.run_dir.final


def load_stage1(cfg):
    """Model, tokenizer, dataset and new tokens from a gti.ground folder (validated first). Sets cfg.data and
    cfg.model to the folder's, so the fine-tuning run records what it really used."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.data.dataset import load_dataset
    from gti.data.slices import subset
    from gti.tokens.vocab import NewTokens

    run = read_run(cfg.init_from, stage="ground", what="init_from=")
    meta, (root, name) = run.meta, run.dataset
    if (cfg.data.name, cfg.data.root) != (name, root):
        get_logger("finetune").info(f"dataset from {run.folder}: {root}/{name} (overrides data.name={cfg.data.name})")
    cfg.data.name, cfg.data.root, cfg.model = name, root, meta["base_model"]
    ds = load_dataset(root, name, need_index=True)
    if file_sha256(ds.path("index")) != meta["sid_index"]["sha256"]:
        raise ConfigError(f"{ds.path('index')} changed since {run.folder} was grounded; re-run gti.ground")
    ds = subset(ds, cfg.data.max_users, cfg.data.max_items)
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32)
    start, tokens = run.new_tokens
    sizes = {start + len(tokens), start + meta["new_tokens"]["count"]}
    if sizes != {len(tokenizer)} or model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise ConfigError(f"{run.model_dir}: tokenizer size {len(tokenizer)} does not match gti.json / embedding rows")
    return model, tokenizer, ds, NewTokens(tokens, start, [[] for _ in tokens]), meta


def run_metadata(stage: str, cfg, ds, new, **extra) -> dict:
    """What gti.json records: the base model, the dataset and SID index (with hashes), the new tokens, the config,
    versions and cost; `extra` adds the stage's own results."""
    return {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "base_model": cfg.model,
        "dataset": {"name": ds.name, "root": str(ds.root), "inter_sha256": file_sha256(ds.path("inter"))},
        "sid_index": {"path": str(ds.path("index")), "sha256": file_sha256(ds.path("index"))},
        "new_tokens": {"start": new.start, "count": len(new), "tokens": new.tokens},
        "init": cfg.init,
        "seed": cfg.seed,
        "versions": versions(),
        "config": to_dict(cfg),
        "cost": peak_memory_mb(),
        **extra,
    }


@dataclass
class Reranking:
    """A finished gti.finetune run made ready to rank its test users again (scripts compare rankings with it)."""

    model: object  # the run's model/, fp32, eval mode
    tokenizer: object
    cfg: dict  # the run's resolved config, as gti.json records it
    test: list  # the first N test examples, in the order of `loader`'s rows (longest prompts first)
    trie: object  # gti.rank.trie.SidTrie of the run's SID index
    loader: object  # left-padded prompt batches, as gti.finetune ranks them


def load_finetuned(run_dir: str | Path, users: int = 0, batch_size: int = 0) -> Reranking:
    """RUN_DIR's model, and its test prompts rebuilt as gti.finetune built them (the same data slice, history
    length, template and trie). `users` > 0: the first N test users only; `batch_size` 0: the run's eval.batch_size."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.data.dataset import leave_one_out, load_dataset
    from gti.data.slices import subset
    from gti.rank.trie import SidTrie
    from gti.train.rows import eval_rows, prompt_loader
    from gti.train.templates import PromptFormatter

    run = read_run(run_dir, "finetune", what="RUN_DIR")
    cfg = run.meta["config"]
    root, name = run.dataset
    ds = subset(load_dataset(root, name, need_index=True), cfg["data"]["max_users"], cfg["data"]["max_items"])
    test = leave_one_out(ds.inter, cfg["data"]["max_history"], train=False)["test"]
    test = test[:users] if users > 0 else test
    tok = AutoTokenizer.from_pretrained(run.model_dir)
    model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32).eval()
    trie = SidTrie([tok.convert_tokens_to_ids(ds.index[i]) for i in sorted(ds.index)], tok.eos_token_id)
    rows = eval_rows(ds, test, PromptFormatter(tok), cfg["templates"][0])  # longest prompts first, as ranked
    loader = prompt_loader(rows, tok.pad_token_id, batch_size or cfg["eval"]["batch_size"])
    return Reranking(model, tok, cfg, [test[i] for i in rows["index"]], trie, loader)
