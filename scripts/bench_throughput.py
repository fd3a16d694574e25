"""The speed table in one run, on CPU or CUDA: training tokens/s, ranking users/s, time to first step.

Measured, side by side in this one process (SmolLM2-135M extended with ML-100K's SID tokens):
  1. ours: the grounding step (overlay rows only) and the fine-tuning step (all parameters) as the stages run
     them: LightningModule + the stages' Trainer (`make_trainer`), timed start-to-start of each loop iteration
     (fetch, device copy, step, logging), in real (unpadded) tokens/s;
  2. raw: a minimal PyTorch twin of the same computation on its own model copy and the same batches: head at
     labelled positions + fp32 cross-entropy, fused AdamW, clip 1.0, autocast for bf16-mixed (a frozen
     backbone held in bf16, as ours), no Lightning;
  3. full: today's full-logits step (trainer.lean_step=false).
  Ours-lean and ours-full alternate step by step (lean, full, full, lean, ...) and a raw step runs before each
  of them, so a shared CPU slows all three alike. Targets: ours/raw >= 0.9x; lean/full is the lean step's gain.
  4. ranking users/s on ML-100K test users (prompts as gti.train.rows.eval_rows builds them, template 0): our decoder
     (`gti.rank.beam_search.constrained_beam_search`) vs HF generate + trie (`hf_constrained_beam_search`), alternating per
     batch, and the share of users for whom both return the same item list. New rows start random, not mean:
     identical rows would tie every SID score and make the comparison meaningless. Both in fp32 (eval.precision's
     default); --rank-precision bf16 tf32 ranks again with ours in those, against its fp32 lists.
  5. time from the command to the first training step of `python -m gti.finetune` (1 step, 2 test users), as
     the stage prints it, run twice: the first on a copy of the dataset folder without its cache, the second finds
     the tokenised-row cache the first one wrote.
  6. the host time a training batch costs before the step (1-3 time pre-collated batches): milliseconds to fetch
     and collate one batch as the stages' loader does (gti.train.rows.StoredRows: arrow columns to padded
     tensors) and as row dicts (`datasets.Dataset.__getitems__`, one Python dict per row: the loader before).
     With no loader workers (trainer.num_workers=0) this time adds to every step.
  7. ms per AdamW step over the fine-tuned model's parameters: torch's default implementation against the fused
     one the stages (and the raw twin) use.
  --profile replaces the table by torch.profiler figures per training step (see profile_training).
    OMP_NUM_THREADS=1 python scripts/bench_throughput.py --steps 1 --warmup 1 --precision 32-true \\
        --rank-users 8 --beams 5 --no-ttfs                     # CPU, a quick look (~3 CPU minutes)
    python scripts/bench_throughput.py --accelerator gpu --steps 20 --warmup 3 --ground-batch 64 \\
        --finetune-batch 32 --rank-users 512 --rank-batch 32  # CUDA, the full table (ttfs on ml-1m)
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIRST_STEP = re.compile(r"first training step began after ([0-9.]+)s")


def sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------------------- training steps
def raw_loss(model, batch: dict) -> torch.Tensor:
    """Next-token loss with the head only where a label is read: (B, T, d) -> (N, d) -> (N, V), fp32 CE. Like ours, it
    hands the decoder its causal mask (transformers' own builder would read the padding back to the host)."""
    from gti.rank.masks import causal_mask

    labels = batch["labels"]
    rows, cols = batch["predict_at"]  # (N,) each, found on the host by the collate: no device sync
    target = labels[:, 1:][rows, cols]
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=causal_mask(model, batch["attention_mask"]), use_cache=False
    ).last_hidden_state
    logits = model.get_output_embeddings()(hidden[rows, cols])
    return torch.nn.functional.cross_entropy(logits.float(), target)


def raw_twin(model, params: list, lr: float, weight_decay: float, precision: str, device: torch.device):
    """One training step in plain PyTorch, batch from the host as a DataLoader gives it. As ours: fused AdamW, and
    under bf16-mixed a frozen backbone's matrices held in bf16 (autocast would re-cast them every step)."""
    from gti.tokens.overlay import FrozenBf16

    model.to(device).train()
    FrozenBf16(model).hold(precision)  # bf16-mixed with a frozen backbone: its matrices to bf16 (else a no-op)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)

    def step(batch: dict) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = raw_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


class Interleaved:
    """Lightning hooks. Each iteration is timed from its on_train_batch_start to the next one's (the whole loop:
    step, logging, scheduler, next fetch and device copy); before it, the raw twin's step on the same batch runs,
    timed on its own. The last batch only closes the iteration before it."""

    def __init__(self, data: list[dict], twin, warmup: int, device: torch.device):
        self.data, self.twin, self.warmup, self.device = data, twin, warmup, device
        self.seconds = {"lean": 0.0, "full": 0.0, "raw": 0.0}
        self.tokens = dict.fromkeys(self.seconds, 0)
        self.t0, self.variant = 0.0, "lean"

    def add(self, variant: str, seconds: float, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.seconds[variant] += seconds
            self.tokens[variant] += int(self.data[batch_idx]["attention_mask"].sum())

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = sync(self.device)
        if batch_idx > 0:
            self.add(self.variant, now - self.t0, batch_idx - 1)
        if batch_idx == len(self.data) - 1:
            return
        if batch_idx == self.warmup:  # a mark to read the GPU's busy share against (gpu_check.sh stamps the time)
            print(f"[bench] warm-up done ({self.warmup} steps), timed steps begin", flush=True)
        self.twin(self.data[batch_idx])
        self.add("raw", sync(self.device) - now, batch_idx)
        module.lean_step = (batch_idx - self.warmup) % 4 in (0, 3)  # ABBA after warm-up: each variant as often first
        self.variant = "lean" if module.lean_step else "full"
        self.t0 = sync(self.device)


def step_speed(module, twin, data: list[dict], precision: str, accelerator: str, warmup: int) -> dict[str, float]:
    """Tokens/s of ours-lean, ours-full and raw over the same batches; len(data) = warmup + 2 * steps + 1."""
    from lightning.pytorch.callbacks import LambdaCallback

    from gti.core.config import TrainerConfig
    from gti.train.trainer import make_trainer

    timer = Interleaved(data, twin, warmup, device_for(accelerator))
    hooks = LambdaCallback(on_train_batch_start=timer.on_train_batch_start)
    cfg = TrainerConfig(max_steps=len(data), accelerator=accelerator, precision=precision)
    with tempfile.TemporaryDirectory() as tmp:  # the stages' Trainer; no progress bar in this table
        trainer = make_trainer(cfg, Path(tmp), len(data), callbacks=[hooks], enable_progress_bar=False)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return {v: timer.tokens[v] / timer.seconds[v] for v in timer.seconds}


def batches(rows: list, batch_size: int, n: int, pad_id: int, multiple: int = 1, seed: int = 0) -> list[dict]:
    from gti.train.rows import collate

    if len(rows) < batch_size * n:
        raise SystemExit(f"{n} batches of {batch_size} need {batch_size * n} distinct rows; there are {len(rows)}: "
                         "lower --steps or the batch size")  # fmt: skip
    picked = [vars(r) for r in random.Random(seed).sample(rows, batch_size * n)]  # Encoded -> {input_ids, labels}
    return [collate(picked[i * batch_size : (i + 1) * batch_size], pad_id, multiple=multiple) for i in range(n)]


def timed_batches(args) -> int:
    """Batches a training stage runs in step_speed: warm-up, lean and full steps alternating, and the one it ends on."""
    return args.warmup + 2 * args.steps + 1


def device_for(accelerator: str) -> torch.device:
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if gpu else "cpu")


def build(args):
    """SmolLM2 extended with ML-100K's SID tokens (random new rows), its grounding and fine-tuning rows."""
    from gti.core.config import DataConfig, FinetuneConfig, GroundStageConfig
    from gti.data.dataset import leave_one_out, load_dataset
    from gti.data.slices import subset
    from gti.testing import grounding_examples, last_per_user, train_rows
    from gti.tokens.extend import extend_model
    from gti.train.templates import PromptFormatter

    ds = subset(load_dataset(args.data_root, args.dataset, need_index=True), 0, 0)
    model, tok, new = extend_model(args.model, ds, "random", {}, None, 0)
    fmt = PromptFormatter(tok)
    ground_rows = grounding_examples(ds, new, fmt, GroundStageConfig().templates, args.ground_len, stage="bench")
    ft = FinetuneConfig(data=DataConfig(max_history=args.history), max_length=args.finetune_len)
    needed = args.finetune_batch * timed_batches(args)  # distinct rows for the batches
    train = last_per_user(leave_one_out(ds.inter, ft.data.max_history)["train"], -(-needed // len(ds.inter)))
    ft_rows = train_rows(ds, train, fmt, ft, new)
    return ds, model, tok, new, fmt, ft, ground_rows, ft_rows


def stage_modules(args, model, tok, new, ft_cfg, ground_rows, ft_rows, n: int) -> dict:
    """stage -> (its LightningModule as the stage builds it, n batches of its rows at the bench's sizes)."""
    from gti.train.grounding import GroundingModule
    from gti.train.recommender import RecommenderModule

    pad, multiple = tok.pad_token_id, args.pad_to_multiple_of
    modules = {
        "finetune": (RecommenderModule(copy.deepcopy(model), tok, None, ft_cfg), batches(ft_rows, args.finetune_batch, n, pad, multiple)),
        "ground": (GroundingModule(model, new, lr=1e-3, weight_decay=0.0, warmup_steps=0), batches(ground_rows, args.ground_batch, n, pad, multiple)),
    }  # fmt: skip
    for module, _ in modules.values():
        module.compile_mode = args.compile  # compiled for the lean path at setup; the full step stays eager
    return modules


def training_speed(args, model, tok, new, ft_cfg, ground_rows, ft_rows) -> dict:
    from gti.tokens.overlay import install_overlay

    pristine = copy.deepcopy(model)  # each (stage, precision) gets a fresh twin: a bf16 one holds its frozen matrices in bf16

    def raw_cell(stage: str) -> tuple:
        twin = copy.deepcopy(pristine)
        if stage == "ground":
            return twin, install_overlay(twin, new.start, len(new)), 1e-3, 0.0
        return twin, list(twin.parameters()), ft_cfg.optim.lr, ft_cfg.optim.weight_decay

    modules = stage_modules(args, model, tok, new, ft_cfg, ground_rows, ft_rows, timed_batches(args))
    speed = {}
    for precision in args.precision:
        for stage in ("ground", "finetune"):
            module, data = modules[stage]
            twin = raw_twin(*raw_cell(stage), precision, device_for(args.accelerator))
            speed[(stage, precision)] = tps = step_speed(module, twin, data, precision, args.accelerator, args.warmup)
            print(f"[bench] {stage} {precision}: ours {tps['lean']:.0f}, raw {tps['raw']:.0f}, "
                  f"full {tps['full']:.0f} tokens/s", flush=True)  # fmt: skip
    return speed


def profile_training(args, model, tok, new, ft_cfg, ground_rows, ft_rows) -> dict:
    """--profile: where the time of ours-lean goes, per stage and precision, as the stages run it (make_trainer,
    trainer.compile as --compile says). torch.profiler records --steps steps after --warmup: wall ms per step
    (from one batch start to the next, synchronised; the profiler's own cost included), ms of torch ops on the
    host (self time: dispatch and CPU kernels; Python between ops is not in it), device kernel ms and kernel
    launches per step, how often a step made the host wait for the device (CUDA), and the top ops. A step is
    host-bound when its kernel time is well under its wall time."""
    modules = stage_modules(args, model, tok, new, ft_cfg, ground_rows, ft_rows, args.warmup + args.steps + 1)
    summary = {}
    for precision in args.precision:
        for stage, (module, data) in modules.items():
            s = summary[(stage, precision)] = profile_steps(args, module, data, precision)
            print(f"[profile] {stage} {precision}: {s['wall_ms']:.1f} ms a step; torch ops on the host {s['host_ms']:.1f} ms "
                  f"({s['ops']:.0f} aten ops); device kernels {s['kernel_ms']:.1f} ms in {s['launches']:.0f} launches "
                  f"({s['kernel_ms'] / s['wall_ms']:.0%} of the step)", flush=True)  # fmt: skip
            if s["kernel_ms"]:  # what the device could do if the host kept up: its kernel time alone per token
                print(f"[profile] {stage} {precision}: {s['tokens'] / s['wall_ms'] * 1e3:.0f} tokens/s as run; "
                      f"{s['tokens'] / s['kernel_ms'] * 1e3:.0f} tokens/s if a step took only its kernel time; "
                      f"the host waited for the device {s['syncs']:.1f} times a step", flush=True)  # fmt: skip
                print(f"[profile] {stage} {precision}: ops that waited, per step (torch's sync debug mode): "
                      f"{s['waits']}", flush=True)  # fmt: skip
            print(s["table"], flush=True)
    return summary


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")  # CUDA runtime calls that block the host


def profile_steps(args, module, data: list[dict], precision: str) -> dict:
    """One stage's lean step under torch.profiler (see profile_training): figures per step and the top-ops tables."""
    from lightning.pytorch.callbacks import LambdaCallback
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    from gti.core.config import TrainerConfig
    from gti.train.trainer import make_trainer

    device, steps, warmup = device_for(args.accelerator), args.steps, args.warmup
    cuda, clock = device.type == "cuda", {}
    prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda,
                   schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1))  # fmt: skip

    def started(_trainer, _module, _batch, i):
        if i in (warmup, warmup + steps):
            clock[i] = sync(device)
        if cuda:  # torch warns at each op that makes the host wait, naming the Python line that called it
            torch.cuda.set_sync_debug_mode("warn" if warmup <= i < warmup + steps else "default")

    module.lean_step = True
    hooks = LambdaCallback(on_train_batch_start=started, on_train_batch_end=lambda *_: prof.step())
    cfg = TrainerConfig(max_steps=len(data), accelerator=args.accelerator, precision=precision)
    with tempfile.TemporaryDirectory() as tmp, prof, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(cfg, Path(tmp), len(data), callbacks=[hooks], enable_progress_bar=False)
        try:
            trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    waited = [w for w in caught if "synchroniz" in str(w.message)]  # a wait in backward is named at .backward()
    for w in caught:  # the other warnings, as they would have been shown
        if w not in waited:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    waits = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in waited)
    ops = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    tables = [ops.table(sort_by=key, row_limit=12) for key in ("self_cpu_time_total", "count")]
    return {
        "tokens": sum(int(b["attention_mask"].sum()) for b in data[warmup : warmup + steps]) / steps,  # real, per step
        "wall_ms": (clock[warmup + steps] - clock[warmup]) / steps * 1e3,
        "host_ms": sum(e.self_cpu_time_total for e in ops) / steps / 1e3,
        "ops": sum(e.count for e in ops if e.key.startswith("aten::")) / steps,
        "kernel_ms": sum(e.device_time_total for e in kernels) / steps / 1e3,
        "launches": len(kernels) / steps,
        # the host waiting for the device (nonzero, .item(), a blocking copy), less the clock's own sync at the first step
        "syncs": max(sum(e.count for e in ops if e.key in SYNC_CALLS) - 1, 0) / steps if cuda else None,
        "waits": ", ".join(f"{where} {n / steps:.1f}" for where, n in waits.most_common(8)) or "none seen",
        "table": "\n".join(tables + [ops.table(sort_by="self_device_time_total", row_limit=12)] * cuda),
    }


# ----------------------------------------------------------------------------------------- data path
def optimizer_speed(args, model, repeats: int = 5) -> dict[str, float]:
    """ms per AdamW step over every parameter of the model (the fine-tuning stage's optimiser), torch's default
    implementation (a for-loop over the tensors on the CPU, foreach on CUDA) against the fused one the stages use
    (gti.train.trainer.fuses_adamw), alternating step by step on one copy of the weights."""
    device = device_for(args.accelerator)
    params = [p.detach().to(device, copy=True).requires_grad_() for p in model.parameters()]  # the model stays as it is
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {"default": torch.optim.AdamW(params, lr=1e-5), "fused": torch.optim.AdamW(params, lr=1e-5, fused=True)}
    ms = dict.fromkeys(opts, 0.0)
    for i in range(repeats + 1):  # the first round builds the moments
        for name, opt in opts.items():
            t = sync(device)
            opt.step()
            ms[name] += (sync(device) - t) * 1e3 / repeats if i else 0.0
    print(f"[bench] AdamW over {len(params)} tensors: torch default {ms['default']:.1f} ms, fused {ms['fused']:.1f} ms "
          "a step", flush=True)  # fmt: skip
    return {**ms, "tensors": len(params)}


def loader_speed(args, pad_id: int, ground_rows: list, ft_rows: list, repeats: int = 20) -> dict:
    """ms per training batch to fetch + collate from stored rows: as StoredRows hands them over, and as row dicts."""
    import datasets

    from gti.train.rows import StoredRows, collate, row_features

    out = {}
    for stage, rows, size in (("ground", ground_rows, args.ground_batch), ("finetune", ft_rows, args.finetune_batch)):
        table = datasets.Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels} for r in rows], features=row_features())
        picks = [random.Random(i).sample(range(len(table)), min(size, len(table))) for i in range(repeats)]
        ms = {}
        for name, fetch in (("stored", StoredRows(table).__getitems__), ("dicts", table.__getitems__)):
            t = time.perf_counter()
            for idx in picks:  # what the DataLoader's fetcher does with a batch of indices
                collate(fetch(idx), pad_id)
            ms[name] = (time.perf_counter() - t) / repeats * 1e3
        out[stage] = ms
        print(f"[bench] {stage} batch of {size}: fetch + collate {ms['stored']:.1f} ms stored, {ms['dicts']:.1f} ms "
              "as row dicts", flush=True)  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------- ranking
def ranking_speed(args, ds, model, tok, fmt) -> dict:
    """Users/s of our decoder vs HF generate + trie on the same prompts, alternating per batch (ABBA)."""
    from gti.data.dataset import leave_one_out
    from gti.rank.beam_search import constrained_beam_search
    from gti.rank.trie import SidTrie, beams_to_items
    from gti.testing import hf_constrained_beam_search
    from gti.train.recommender import ranking_precision
    from gti.train.rows import eval_rows, prompt_loader

    device = device_for(args.accelerator)
    users = args.rank_users or (512 if device.type == "cuda" else 8)
    test = leave_one_out(ds.inter, args.history)["test"][:users]
    rows = eval_rows(ds, test, fmt, 0)  # as gti.finetune batches them: longest prompts first

    def prompts_of(size: int) -> list[dict]:  # the batches gti.finetune ranks (prompt_loader)
        return list(prompt_loader(rows, tok.pad_token_id, size))

    prompts = prompts_of(args.rank_batch[0])
    trie = SidTrie([tok.convert_tokens_to_ids(ds.index[i]) for i in sorted(ds.index)], tok.eos_token_id).to(device)
    model.to(device).eval()
    decoders = {"ours": constrained_beam_search, "hf": hf_constrained_beam_search}

    def rank(name: str, batch: dict) -> list[list[int]]:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.no_grad():
            return beams_to_items(decoders[name](model, tok, ids, mask, trie, args.beams, args.beams), trie)

    for name in decoders:  # warm-up on one prompt, 2 beams
        ids, mask = (prompts[0][k][:1].to(device) for k in ("input_ids", "attention_mask"))
        decoders[name](model, tok, ids, mask, trie, 2, 2)
    seconds, items = {"ours": 0.0, "hf": 0.0}, {"ours": [], "hf": []}
    for i, batch in enumerate(prompts):
        for name in ("ours", "hf") if i % 4 in (0, 3) else ("hf", "ours"):
            t = sync(device)
            items[name] += rank(name, batch)
            seconds[name] += sync(device) - t
    same = sum(a == b for a, b in zip(items["ours"], items["hf"])) / len(test)
    out = {"users": len(test), **{n: len(test) / s for n, s in seconds.items()}, "identical": same, "precisions": {}}
    print(f"[bench] ranking {len(test)} users, beam {args.beams}, batch {args.rank_batch[0]}: ours {out['ours']:.1f}, "
          f"hf {out['hf']:.1f} users/s; identical item lists for {same:.0%}", flush=True)  # fmt: skip

    def ours_in(precision: str, batches: list[dict], size: int) -> dict:
        """Ours again in another arithmetic or batch size: users/s, and its lists against fp32's at the first size."""
        with ranking_precision(model, precision):  # as eval.precision sets it
            rank("ours", batches[0])  # untimed: no first use of a kernel is timed
            t, lists = sync(device), []
            for batch in batches:
                lists += rank("ours", batch)
            speed = len(test) / (sync(device) - t)
        top10 = sum(a[:10] == b[:10] for a, b in zip(lists, items["ours"])) / len(test)
        whole = sum(a == b for a, b in zip(lists, items["ours"])) / len(test)
        print(f"[bench] ranking in {precision}, batch {size}: ours {speed:.1f} users/s ({speed / out['ours']:.2f}x fp32 "
              f"at batch {args.rank_batch[0]}); the same top 10 as there for {top10:.0%} of users, the same "
              f"{args.beams} items for {whole:.0%}", flush=True)  # fmt: skip
        return {"users/s": speed, "top10_equal": top10, "identical": whole}

    for precision in [p for p in args.rank_precision if p != "fp32"]:
        out["precisions"][precision] = ours_in(precision, prompts, args.rank_batch[0])
    for size in args.rank_batch[1:]:  # larger batches: ours alone (HF's speed hardly depends on the batch)
        for precision in args.rank_precision:
            out["precisions"][f"{precision}, batch {size}"] = ours_in(precision, prompts_of(size), size)
    return out


# ----------------------------------------------------------------------------------------- time to first step
def sids_overrides(root: str, name: str) -> list[str]:
    """The stage must use the index on disk: pass the quantiser settings its report records (ml-1m: 3 x 64)."""
    import json

    from gti.core.config import SidsConfig

    report = Path(root) / name / f"{name}.sids_report.json"
    settings = json.loads(report.read_text()).get("settings", {}) if report.is_file() else {}
    keys = set(SidsConfig.__dataclass_fields__) - {"data", "encoder"}  # encoder is recorded as a file tag
    return [f"sids.{k}={json.dumps(v)}" for k, v in settings.items() if k in keys]


def time_to_first_step(args) -> list[tuple[float | None, float]]:
    """(seconds to the first training step as the stage prints it, wall seconds of the whole command), x2.
    The dataset folder is copied without its cache/ into a temp dir, so the first run starts cold."""
    import shutil

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.data_root) / args.ttfs_dataset
        shutil.copytree(src, Path(tmp, "data", args.ttfs_dataset), ignore=shutil.ignore_patterns("cache"))
        cmd = [sys.executable, "-m", "gti.finetune", f"data.name={args.ttfs_dataset}", f"data.root={tmp}/data",
               *sids_overrides(args.data_root, args.ttfs_dataset), f"model={args.model}", "max_length=192",
               "trainer.max_steps=1", f"trainer.accelerator={args.accelerator}", f"trainer.precision={args.precision[0]}",
               "eval.max_users=2", "eval.valid=false", "eval.num_beams=5", "eval.ks=[5]", f"output_dir={tmp}/run"]  # fmt: skip
        for run in ("first", "second"):
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
            found = FIRST_STEP.search(proc.stdout + proc.stderr)
            runs.append((float(found.group(1)) if found else None, wall))
            shown = f"{runs[-1][0]:.1f}s" if found else "n/a (stage does not print it)"
            print(f"[bench] gti.finetune on {args.ttfs_dataset}, {run} run: first step after {shown}, "
                  f"command took {wall:.1f}s", flush=True)  # fmt: skip
    return runs


# ----------------------------------------------------------------------------------------- report
def print_table(args, speed: dict, optim: dict, loading: dict, ranking: dict | None, ttfs: list | None) -> None:
    gpu = device_for(args.accelerator).type == "cuda"
    where = f"cuda ({torch.cuda.get_device_name()})" if gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\nmodel={args.model} on {where}")
    if speed:
        print(f"ground {args.ground_batch} x {args.ground_len}, finetune {args.finetune_batch} x {args.finetune_len}; "
              f"{args.steps} steps per variant, interleaved")  # fmt: skip
        compiled = f", trainer.compile=true, compile_mode={args.compile}" if args.compile else ""
        print(f"{'stage':9} {'precision':11} {'ours tok/s':>11} {'raw tok/s':>10} {'full tok/s':>11} "
              f"{'ours/raw':>9} {'lean/full':>10}")  # fmt: skip
        for (stage, precision), s in speed.items():
            print(f"{stage:9} {precision:11} {s['lean']:11.0f} {s['raw']:10.0f} {s['full']:11.0f} "
                  f"{s['lean'] / s['raw']:8.2f}x {s['lean'] / s['full']:9.2f}x")  # fmt: skip
        print(f"ours = the stages' lean step (LightningModule + make_trainer{compiled}); raw = plain PyTorch twin "
              "(target ours/raw >= 0.9x); full = trainer.lean_step=false")  # fmt: skip
    if optim:
        print(f"\nAdamW step over the {optim['tensors']} fine-tuned tensors: torch default {optim['default']:.1f} ms, "
              f"fused (ours and raw) {optim['fused']:.1f} ms ({optim['default'] / optim['fused']:.1f}x)")  # fmt: skip
    if loading:
        print("\nhost time per training batch before the step (fetch + collate, no loader workers): "
              + "; ".join(f"{stage} {ms['stored']:.1f} ms (as row dicts {ms['dicts']:.1f} ms, "
                          f"{ms['dicts'] / ms['stored']:.1f}x)" for stage, ms in loading.items()))  # fmt: skip
    if ranking:
        print(f"\nranking {ranking['users']} {args.dataset} test users, beam {args.beams}, batch {args.rank_batch[0]}: "
              f"ours {ranking['ours']:.1f} users/s, HF generate + trie {ranking['hf']:.1f} users/s, "
              f"ours/hf {ranking['ours'] / ranking['hf']:.2f}x; identical item lists {ranking['identical']:.0%}")  # fmt: skip
        for precision, r in ranking["precisions"].items():
            print(f"  ours in {precision}: {r['users/s']:.1f} users/s ({r['users/s'] / ranking['ours']:.2f}x fp32), "
                  f"top 10 as in fp32 for {r['top10_equal']:.0%} of users")  # fmt: skip
    if ttfs:
        shown = [f"{s:.1f}s" if s is not None else "n/a (stage does not print it)" for s, _ in ttfs]
        print(f"\ntime to first training step, gti.finetune on {args.ttfs_dataset}: first run {shown[0]}, "
              f"second (cached) run {shown[1]} (whole commands: {ttfs[0][1]:.0f}s, {ttfs[1][1]:.0f}s)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--ground-batch", type=int, default=16)
    ap.add_argument("--ground-len", type=int, default=64)
    ap.add_argument("--finetune-batch", type=int, default=8)
    ap.add_argument("--finetune-len", type=int, default=96)
    ap.add_argument("--history", type=int, default=10, help="items of history in a row / prompt (fits --finetune-len)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant (lean and full alternate)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"])
    ap.add_argument("--accelerator", default="auto", help="auto | cpu | gpu")
    ap.add_argument("--threads", type=int, default=0, help=">0: torch.set_num_threads")
    ap.add_argument("--compile", nargs="?", const="default", help="ours as trainer.compile=true runs it, in this "
                    "trainer.compile_mode (default: default; the full step and raw stay eager); give --warmup 6 or more: "
                    "compiling, and one recompile for a new batch width, happen in warm-up")
    ap.add_argument("--pad-to-multiple-of", type=int, default=1, help="batch widths as trainer.pad_to_multiple_of pads them")
    ap.add_argument("--profile", action="store_true", help="instead of the table: torch.profiler on ours-lean, each "
                    "stage, --steps steps after --warmup (where a step's time goes: host ops, device kernels, launches)")
    ap.add_argument("--rank-users", type=int, default=0, help="test users ranked (0: 8 on CPU, 512 on CUDA)")
    ap.add_argument("--rank-batch", type=int, nargs="+", default=[16], help="prompts per beam search (eval.batch_size); "
                    "the first is compared with HF, later ones rank ours alone in each --rank-precision")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--rank-precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "tf32"],
                    help="ours also ranks in these (fp32 is the comparison with HF): speed and lists against fp32")  # fmt: skip
    ap.add_argument("--no-rank", action="store_true", help="skip the ranking comparison")
    ap.add_argument("--no-train", action="store_true", help="skip the training steps and the loader timing")
    ap.add_argument("--ttfs-dataset", default="ml-1m", help="dataset of the time-to-first-step runs")
    ap.add_argument("--no-ttfs", action="store_true", help="skip time to first step (2 gti.finetune runs; slow)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    ds, model, tok, new, fmt, ft_cfg, ground_rows, ft_rows = build(args)
    if args.profile:
        profile_training(args, model, tok, new, ft_cfg, ground_rows, ft_rows)
        return
    ranking = None if args.no_rank else ranking_speed(args, ds, model, tok, fmt)  # before the overlay goes in
    optim = {} if args.no_train else optimizer_speed(args, model)
    speed = {} if args.no_train else training_speed(args, model, tok, new, ft_cfg, ground_rows, ft_rows)
    loading = {} if args.no_train else loader_speed(args, tok.pad_token_id, ground_rows, ft_rows)
    ttfs = None if args.no_ttfs else time_to_first_step(args)
    print_table(args, speed, optim, loading, ranking, ttfs)


if __name__ == "__main__":
    main()
