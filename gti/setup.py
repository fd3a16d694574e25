"""Pieces both stages share: data on demand, an extended + initialised model, the Trainer, run folders."""

from __future__ import annotations

import copy
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gti import STARTED
from gti.config import DataConfig, SidsConfig, TrainerConfig, to_dict, to_yaml
from gti.data import Dataset, dataset_file, item_text, load_dataset
from gti.errors import ConfigError
from gti.io import atomic_write_text, file_sha256, write_json
from gti.vocab import NewTokens, add_tokens, read_tokens_file, resize, set_rows, sid_descriptions, sid_tokens

SCHEMA_VERSION = 1
PACKAGED = ("ml-100k", "ml-1m")


def ensure_dataset(data: DataConfig, sids: SidsConfig) -> Dataset:
    """Load data/NAME with its SID index; prepare MovieLens and build a missing index on demand.
    An existing index built with other settings than `sids` is a ConfigError (only sids.force=true rebuilds)."""
    if not dataset_file(data.root, data.name, "inter").is_file():
        if data.name not in PACKAGED:
            raise ConfigError(
                f"data.name={data.name}: {dataset_file(data.root, data.name, 'inter')} not found; "
                f"run `python -m gti.prepare` for it first"
            )
        from gti.config import PrepareConfig
        from gti.prepare import run as prepare

        prepare(PrepareConfig(dataset=data.name, root=data.root))
    from gti.sids import run as build_sids

    sids.data = data
    # builds a missing index; an existing one is used only when it matches `sids` (or was imported,
    # or has no report): a stage never replaces an index that finished runs depend on (design.md §10)
    build_sids(sids, stage=True)
    ds = load_dataset(data.root, data.name, need_index=True)
    return subset(ds, data.max_users, data.max_items)


def subset(ds: Dataset, max_users: int, max_items: int) -> Dataset:
    """Smaller slices for demos and tests; SIDs and items stay whole so the trie is the real one.

    max_items keeps whole users (those whose every item is among the first N ids): dropping items from
    the middle of a sequence would invent transitions the user never made.
    """
    inter = ds.inter
    if max_items > 0:
        inter = {u: s for u, s in inter.items() if max(s, default=max_items) < max_items and len(s) >= 3}
        if not inter:
            raise ConfigError(f"data.max_items={max_items}: no user of {ds.name} has all items below it; raise it or use 0")
    if max_users > 0:
        inter = {u: inter[u] for u in sorted(inter)[:max_users]}
    return Dataset(ds.name, ds.root, inter, ds.items, ds.index)


def item_texts(ds: Dataset) -> dict[int, str]:
    return {i: item_text(meta) for i, meta in ds.items.items()}


def extend_model(
    model_name: str,
    ds: Dataset,
    init: str,
    init_options: dict,
    tokens_file: str | None,
    seed: int,
    dtype: torch.dtype = torch.float32,
):
    """Base model + tokenizer -> (model, tokenizer, NewTokens) with the new rows initialised by `init`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.assets import resolve_model
    from gti.init_strategies import InitContext, initialize_rows

    path = resolve_model(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    base_tokenizer = copy.deepcopy(tokenizer)  # strategies tokenise with the old vocabulary
    n_old = model.get_input_embeddings().weight.shape[0]
    old_input = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings()
    tied = head is None or head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    old_output = None if tied else head.weight.detach().clone()

    tokens = sid_tokens(ds.index)
    descriptions = sid_descriptions(ds.index, item_texts(ds), tokens)
    if tokens_file:
        extra, extra_desc = read_tokens_file(tokens_file)
        tokens, descriptions = tokens + extra, descriptions + extra_desc
    new = add_tokens(tokenizer, tokens, descriptions)
    resize(model, tokenizer)
    # strategies read only the rows of the real old vocabulary (spare rows of Qwen-like models excluded)
    n_real = min(n_old, new.start)
    ctx = InitContext(
        old_input=old_input[:n_real],
        old_output=None if old_output is None else old_output[:n_real],
        tokenizer=base_tokenizer,
        model=model,
        new_tokens=new.tokens,
        descriptions=new.descriptions,
        dictionary=dict(init_options.get("dictionary", {})),
        options=dict(init_options),
        generator=torch.Generator().manual_seed(seed),
    )
    input_rows, output_rows = initialize_rows(init, ctx)
    set_rows(model, new, input_rows, output_rows)
    return model, tokenizer, new


# config keys under which a causal LM's forward does more than `head(hidden)` + cross-entropy: softcapped
# (Gemma 2/3) or scaled (Cohere, Granite) logits, an MoE router loss. Such models take HF's full path.
FULL_LOSS_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_router_logits")


def lean_lm_loss(model, batch: dict, decoder=None) -> torch.Tensor:
    """HF's causal-LM loss (transformers' ForCausalLMLoss: fp32 cross-entropy, mean over labelled
    tokens) with the LM head applied only where a label is read (design.md §10). Works for a plain
    HF model, a peft-wrapped one and the overlay's NewRowsHead (tied or untied). `decoder`: the
    model's decoder forward compiled (trainer.compile), else the decoder itself."""
    labels = batch["labels"]
    keep = labels[:, 1:] != -100  # (B, T-1): position t predicts token t+1
    # the boolean index needs the count on the host: taken before the forward is queued, it waits
    # only for the batch's copy to the device, not for the decoder's compute
    target = labels[:, 1:][keep]  # (N,)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA layers sit in place
    hidden = (decoder or base.get_decoder())(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (B, T, d)
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V), not (B, T, V)
    return torch.nn.functional.cross_entropy(logits.float(), target)


def uses_full_loss(model) -> bool:
    return any(getattr(model.config, k, None) for k in FULL_LOSS_KEYS)


def takes_lean_step(module) -> bool:
    return module.lean_step and not uses_full_loss(module.model)


def compile_training_forward(module) -> None:
    """trainer.compile: torch.compile the forward the training step runs, the decoder's under the lean step, the
    whole model's otherwise; ranking and generation stay eager (their shapes change every step).

    A compiled bound `forward`, not a compiled module: stored on the LightningModule, an `OptimizedModule` would
    become a submodule and every weight would appear twice in its state_dict."""
    model = module.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    target = base.get_decoder() if takes_lean_step(module) else model
    module.compiled_forward = torch.compile(target.forward)


def start_fit(module) -> None:
    """Both LightningModules' setup("fit"): a frozen backbone held in bf16 under bf16 precision (gti.overlay.FrozenBf16),
    the sampler's rows grouped by optimizer step, the training forward compiled (trainer.compile)."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    strategy = module.trainer.strategy
    # sharded strategies (FSDP, DeepSpeed) cast in their own gather and want one dtype per flat parameter
    if isinstance(strategy, SingleDeviceStrategy | DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy):
        module.frozen_bf16.hold(module.trainer.precision)  # a no-op for full fine-tuning and non-bf16 runs
    if module.sampler is not None:
        module.sampler.accumulate = module.trainer.accumulate_grad_batches
    if module.compile_step:
        compile_training_forward(module)


def lm_training_step(module, batch: dict) -> torch.Tensor:
    """Next-token loss of `module.model` on a batch, logged; a NaN/inf loss stops the run (both stages).

    `module.lean_step` (trainer.lean_step) picks the lean loss; false: HF's full-logits forward, for comparisons."""
    model = module.model
    compiled = getattr(module, "compiled_forward", None)  # see compile_training_forward
    loss = lean_lm_loss(model, batch, compiled) if takes_lean_step(module) else (compiled or model)(**batch).loss
    note_divergence(module, loss)
    t, n = module.trainer, module.global_step + 1  # n: optimizer steps once this one is done
    if n % t.log_every_n_steps == 0 or n == t.max_steps or t.is_last_batch:  # and before every checkpoint
        stop_if_diverged(module)
    module.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
    return loss


def note_divergence(module, loss: torch.Tensor) -> None:
    """Keep (step, loss) of the first non-finite loss on the device: no device->host sync per step."""
    first = getattr(module, "_first_bad", None)
    if first is None or first.device != loss.device:
        first = module._first_bad = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=loss.device)
    step = torch.full((), module.global_step, dtype=torch.float64, device=loss.device)  # a fill, not a copy from the host
    now = torch.stack([step, loss.detach().double()])
    first.copy_(torch.where((first[0] < 0) & ~torch.isfinite(now[1]), now, first))


def stop_if_diverged(module) -> None:
    """Raise at logging steps, the last step and before any checkpoint is written, naming the first bad step."""
    first = getattr(module, "_first_bad", None)
    if first is None or first[0] < 0:  # one sync, at this step only
        return
    from gti.errors import TrainingError

    ckpt = Path(module.trainer.default_root_dir) / "checkpoints"
    raise TrainingError(
        f"loss is {first[1].item()} at step {int(first[0])}; stopped. "
        f"The last good checkpoint is in {ckpt} (resume=auto continues from it)"
    )


def adamw_with_warmup(params, lr: float, weight_decay: float, warmup_steps: int) -> dict:
    """AdamW + linear warm-up, in Lightning's `configure_optimizers` format (stepped per batch)."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)
    warm = max(warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def set_threads(t: TrainerConfig) -> None:
    """trainer.threads > 0: torch's CPU threads for this process (several runs sharing one machine, design.md §10)."""
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
        print(f"[gti] first training step began after {process_age():.1f}s", flush=True)


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
    """Lightning's FSDP precision refuses norm clipping; FSDP's own clip_grad_norm_ takes the norm over all shards."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = module.trainer.strategy.model
    if clip_val and isinstance(wrapped, FSDP) and algorithm in (None, "norm"):
        wrapped.clip_grad_norm_(clip_val)
    else:
        module.clip_gradients(optimizer, clip_val, algorithm)


def make_trainer(t: TrainerConfig, run_dir: Path, max_steps: int, callbacks: list | None = None, **kw):
    import lightning as L
    from lightning.pytorch.callbacks import LambdaCallback, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    set_threads(t)
    strategy = t.strategy
    if strategy == "auto" and (t.devices > 1 or t.num_nodes > 1):
        strategy = "ddp"  # multi-GPU is one line (style.md §11)
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=t.checkpoint_every or None)
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
            ckpt,
            LambdaCallback(on_save_checkpoint=lambda _t, module, _c: stop_if_diverged(module)),
            LambdaCallback(on_train_batch_start=lambda trainer, *_: report_first_step(trainer)),
            # the bar reads the logged loss with .item(), a device sync: every log_every_n_steps, not every step
            *([TQDMProgressBar(refresh_rate=max(t.log_every_n_steps, 1))] if kw.get("enable_progress_bar", True) else []),
            *(callbacks or []),
        ],
        default_root_dir=run_dir,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **val,
        **kw,
    )


def versions() -> dict:
    import lightning
    import transformers

    return {
        "gti": __import__("gti").__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
    }


def peak_memory_mb() -> dict:
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def run_metadata(stage: str, cfg, ds: Dataset, new: NewTokens, **extra) -> dict:
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


def global_rank() -> int:
    """Rank before the Trainer exists: Lightning's DDP launcher sets these for the processes it starts."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


@dataclass
class RunDir:
    """A run is built in `<out>.partial/` and renamed to `<out>/` once complete.

    A killed run therefore never leaves a folder that looks finished, and `resume=auto` finds its
    checkpoints in the `.partial` folder.
    """

    final: Path

    @property
    def work(self) -> Path:
        return self.final.with_name(self.final.name + ".partial")

    def start(self, resume: str, cfg) -> Path:
        if resume not in ("never", "auto"):
            raise ConfigError(f"resume must be 'never' or 'auto', got {resume!r}")
        if global_rank() != 0:  # rank 0 owns the folder; other DDP ranks only read it
            return self.work
        if resume == "never" and self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.work / "config.yaml", to_yaml(cfg))
        return self.work

    def last_checkpoint(self, resume: str) -> str | None:
        last = self.work / "checkpoints" / "last.ckpt"
        return str(last) if resume == "auto" and last.is_file() else None

    def finish(self) -> Path:
        if self.final.exists():
            old = self.final.with_name(self.final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
            shutil.rmtree(old)
        shutil.rmtree(self.work / "checkpoints", ignore_errors=True)  # big; the model/ folder is the result
        os.replace(self.work, self.final)
        return self.final


def save_hf(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_metadata(folder: Path, meta: dict) -> None:
    write_json(folder / "gti.json", meta)
