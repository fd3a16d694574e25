"""Training-step throughput features: a frozen backbone held in bf16, length-grouped batches,
torch.compile of the training forward, threads / nodes, and the time-to-first-step line (tiny Llama, CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from fixtures import add_callbacks, write_toy_dataset

from gti.core.config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    GroundConfig,
    GroundStageConfig,
    LoraConfig,
    OptimConfig,
    TrainerConfig,
)
from gti.train.batching import EpochShuffleSampler, group_by_length, padded_share, padding_summary


# ----------------------------------------------------------------------------------------- helpers
class Dtypes(L.Callback):
    """{frozen matrices, frozen vectors, trainable} -> dtypes seen at each training / validation batch."""

    def __init__(self):
        self.train: list[dict] = []
        self.val: list[dict] = []

    @staticmethod
    def kinds(module) -> dict:
        out: dict[str, set] = {"frozen_matrix": set(), "frozen_vector": set(), "trainable": set()}
        for p in module.model.parameters():
            kind = "trainable" if p.requires_grad else "frozen_matrix" if p.ndim >= 2 else "frozen_vector"
            out[kind].add(p.dtype)
        return out

    def on_train_batch_start(self, trainer, module, *args):
        self.train.append(self.kinds(module))
        self.fused = trainer.optimizers[0].defaults["fused"]

    def on_validation_batch_start(self, trainer, module, *args):
        self.val.append(self.kinds(module))


def toy_data(tmp_path: Path) -> DataConfig:
    write_toy_dataset(tmp_path / "data")  # 9 users x 6 items, 12 items, SIDs of 3 tokens (9 new tokens)
    return DataConfig(name="toy", root=str(tmp_path / "data"))


def weights(folder) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


BF16, FP32 = {torch.bfloat16}, {torch.float32}


# ----------------------------------------------------------------------------------------- bf16 backbone
def test_bf16_grounding_holds_frozen_lm_in_bf16_and_saves_exact_weights(tmp_path, tiny_model_dir, monkeypatch):
    from gti.ground import run

    seen = Dtypes()
    add_callbacks(monkeypatch, seen)
    cfg = GroundConfig(
        model=tiny_model_dir, data=toy_data(tmp_path), diagnostics=False, output_dir=str(tmp_path / "g"),
        ground=GroundStageConfig(templates=["title2sid", "sid2title"]), optim=OptimConfig(lr=1e-2, batch_size=8),
        trainer=TrainerConfig(max_steps=3, accelerator="cpu", log_every_n_steps=1, precision="bf16-mixed"),
    )  # fmt: skip
    out = run(cfg)  # run() itself checks torch.equal on the old embedding rows after fit
    assert len(seen.train) == 3
    for kinds in seen.train:  # during fit: frozen matrices bf16, norms fp32, the new-row table fp32 (master weights)
        assert kinds == {"frozen_matrix": BF16, "frozen_vector": FP32, "trainable": FP32}
    assert seen.fused  # and clipped (gradient_clip_val 1.0) although Lightning's bf16 plugin refuses a fused optimizer
    meta = json.loads((out / "gti.json").read_text())
    assert meta["final_loss"] is not None and torch.isfinite(torch.tensor(meta["final_loss"]))
    start, n = meta["new_tokens"]["start"], meta["new_tokens"]["count"]
    saved, base = weights(out / "model"), weights(tiny_model_dir)
    for k, w in base.items():  # fp32 base + trained rows, bit for bit
        if k == "model.embed_tokens.weight":
            assert torch.equal(saved[k][:start], w)
            assert saved[k].dtype == torch.float32 and saved[k].shape[0] == start + n
        elif k != "lm_head.weight":  # tied
            assert saved[k].dtype == torch.float32 and torch.equal(saved[k], w), k


def test_bf16_lora_finetune_trains_in_bf16_and_ranks_with_exact_weights(tmp_path, tiny_model_dir, monkeypatch):
    from gti.finetune import run

    seen = Dtypes()
    add_callbacks(monkeypatch, seen)
    cfg = FinetuneConfig(
        model=tiny_model_dir, data=toy_data(tmp_path), init="mean", lora=LoraConfig(enabled=True),
        optim=OptimConfig(lr=1e-3, batch_size=8),
        trainer=TrainerConfig(max_steps=2, accelerator="cpu", log_every_n_steps=1, precision="bf16-mixed", val_check_interval=2),
        eval=EvalConfig(num_beams=4, ks=[1, 4], batch_size=4, max_users=2), output_dir=str(tmp_path / "ft"),
    )  # fmt: skip
    out = run(cfg)
    assert len(seen.train) == 2 and seen.val  # validation inside fit (after step 2), then validate + test
    for kinds in seen.train:
        assert kinds == {"frozen_matrix": BF16, "frozen_vector": FP32, "trainable": FP32}
    assert seen.fused
    for kinds in seen.val:  # ranking sees the exact fp32 weights, inside fit too
        assert kinds == {"frozen_matrix": FP32, "frozen_vector": FP32, "trainable": FP32}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["count"] == 2
    saved, base = weights(out / "model"), weights(tiny_model_dir)
    start = json.loads((out / "gti.json").read_text())["new_tokens"]["start"]
    # LoRA merged into the projections; what it does not touch is the fp32 base, bit for bit
    assert torch.equal(saved["model.embed_tokens.weight"][:start], base["model.embed_tokens.weight"])
    for k in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(saved[k], base[k]), k
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_adamw_is_fused_unless_a_scaler_or_a_sharded_strategy_is_in_the_way():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

    from gti.train.trainer import fuses_adamw

    params = [torch.nn.Parameter(torch.zeros(3))]
    plain = SimpleNamespace(precision_plugin=SimpleNamespace(), strategy=SingleDeviceStrategy(torch.device("cpu")))
    assert fuses_adamw(plain, params)
    assert fuses_adamw(L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False), params)
    assert not fuses_adamw(None, params)  # configure_optimizers called outside a fit
    assert not fuses_adamw(plain, [])
    scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()), strategy=plain.strategy)  # fp16
    assert not fuses_adamw(scaled, params)
    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):  # DeepSpeed: not installed here
        assert not fuses_adamw(SimpleNamespace(precision_plugin=SimpleNamespace(), strategy=strategy), params)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_a_fused_adamw_is_clipped_as_lightning_clips(algorithm):
    from types import SimpleNamespace

    from gti.train.trainer import clip_gradients

    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p], fused=True)
    module = SimpleNamespace(trainer=SimpleNamespace(strategy=SimpleNamespace(model=None)))
    p.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])  # norm 5
    clip_gradients(module, opt, 0.5, algorithm)
    want = torch.tensor([0.3, -0.4, 0.0, 0.0]) if algorithm == "norm" else torch.tensor([0.5, -0.5, 0.0, 0.0])
    torch.testing.assert_close(p.grad, want)


def test_held_backbone_gives_the_autocast_loss(tokenizer):
    """Holding the frozen matrices in bf16 rounds them as autocast does; the residual stream stays fp32."""
    from gti.testing import make_tiny_llama
    from gti.tokens.overlay import FrozenBf16, install_overlay
    from gti.train.step import lean_lm_loss

    model = make_tiny_llama(len(tokenizer) + 4)
    install_overlay(model, len(tokenizer), 4)
    ids = torch.tensor([[1, 50, 60, len(tokenizer), len(tokenizer) + 1, 2], [1, 70, len(tokenizer) + 2, 2, 2, 2]])
    batch = {"input_ids": ids, "attention_mask": (ids != 2).long(), "labels": ids.masked_fill(ids == 2, -100)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = lean_lm_loss(model, batch)
        held = FrozenBf16(model)
        held.hold("bf16-mixed")
        assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        loss = lean_lm_loss(model, batch)
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    held.exact()
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n
    FrozenBf16(model).hold("32-true")  # not a bf16 run: nothing changes
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------------------- length grouping
def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Most rows short, a long tail (mean 28 tokens), like grounding rows with and without descriptions."""
    g = torch.Generator().manual_seed(seed)
    return [8 + int(x) for x in -20 * torch.log(torch.rand(n, generator=g))]


def test_grouping_cuts_padding_and_keeps_every_index_once():
    lengths = skewed_lengths(1000)
    plain = EpochShuffleSampler(1000, 3, 16)
    grouped = EpochShuffleSampler(1000, 3, 16, lengths=lengths)
    for epoch in range(3):
        for s in (plain, grouped):
            s.set_epoch(epoch)
            assert sorted(s) == list(range(1000))  # every index once per epoch
    before, after = padded_share(lengths, 16, plain.order(0)), padded_share(lengths, 16, grouped.order(0))
    assert before > 0.3 and after < before / 3, (before, after)
    line = padding_summary(grouped, lengths)
    assert line == f"padded share {before:.0%} -> {after:.0%} (batches grouped by length)"
    assert padding_summary(plain, lengths) == f"padded share {before:.0%} (trainer.group_by_length=false)"
    # widths rounded up to a multiple of 64 (trainer.pad_to_multiple_of): more padding, counted as such
    wide = padded_share(lengths, 16, grouped.order(0), multiple=64)
    assert wide > after and padding_summary(grouped, lengths, 64).endswith(f"-> {wide:.0%} (batches grouped by length)")
    # the batch order is shuffled: the first batches are not simply the shortest rows
    firsts = [max(lengths[i] for i in grouped.order(0)[k : k + 16]) for k in range(0, 160, 16)]
    assert firsts != sorted(firsts)


def test_grouped_order_is_deterministic_per_seed_and_epoch():
    lengths = skewed_lengths(300)
    a, b = EpochShuffleSampler(300, 1, 8, lengths), EpochShuffleSampler(300, 1, 8, lengths)
    assert a.order(0) == b.order(0) and a.order(1) == b.order(1)
    assert a.order(0) != a.order(1) != EpochShuffleSampler(300, 2, 8, lengths).order(1)
    a.set_epoch(1)
    assert list(a) == b.order(1)


def test_an_optimizer_step_holds_the_same_rows_however_it_is_split():
    """Grouping works on whole optimizer steps: 2 accumulated batches of 4 = 1 batch of 8, and under DDP too."""
    lengths = skewed_lengths(500)
    one = EpochShuffleSampler(500, 0, 8, lengths).order(0)
    assert EpochShuffleSampler(500, 0, 4, lengths, accumulate=2).order(0) == one
    assert EpochShuffleSampler(500, 0, 2, lengths, accumulate=2).order(0, world_size=2) == one


def test_loader_state_resumes_after_the_batches_already_trained():
    """Lightning saves the loader's state_dict in checkpoints and gives it back before a resumed epoch."""
    from gti.train.batching import ResumableLoader

    s, fresh = (EpochShuffleSampler(100, 0, 8, skewed_lengths(100)) for _ in range(2))
    loader, again = (ResumableLoader(list(range(100)), x, batch_size=8) for x in (s, fresh))
    s.set_epoch(2)
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(3)]
    assert loader.state_dict() == {"epoch": 2, "batches": 3}  # what a checkpoint after the 3rd batch holds
    again.load_state_dict(loader.state_dict())
    fresh.set_epoch(2)  # Lightning sets the epoch after loading the state, before the first batch
    rest = [b.tolist() for b in again]
    assert [i for b in seen + rest for i in b] == s.order(2)  # the interrupted epoch continues after its 3 batches
    assert again.state_dict() == {"epoch": 2, "batches": 13}  # counted from the resume point, the short last batch too
    assert [i for b in again for i in b] == fresh.order(2)  # and only that pass skips
    fresh.resume(2, 3)
    fresh.set_epoch(3)  # a checkpoint at the epoch's end: the next epoch starts from its beginning
    assert list(fresh) == fresh.order(3)


def test_resume_under_ddp_gives_every_rank_its_remaining_batches():
    """Lightning's DistributedSamplerWrapper reads len(sampler) positions, pads by wrapping round to position 0
    and deals them out by stride: after a resume each rank sees the rest of its uninterrupted batches, padding too."""
    n, bs, world, done = 101, 4, 3, 2  # 101 rows on 3 ranks: padded to 102

    def rank_rows(positions, rank):  # torch's DistributedSampler (shuffle=False): padded to 102, dealt out by stride
        return [positions[i] for i in (list(range(n)) + [0])[rank::world]]

    s = EpochShuffleSampler(n, 0, bs, skewed_lengths(n))
    full = s.positions(world)
    s.resume(0, done)
    resumed = s.positions(world)
    for rank in range(world):
        ref, res = rank_rows(full, rank), rank_rows(resumed, rank)
        assert res[: len(ref) - done * bs] == ref[done * bs :]


def test_partial_batch_stays_last_so_batches_stay_aligned():
    lengths = [i % 37 + 1 for i in range(103)]
    order = group_by_length(list(range(103)), lengths, 10, torch.Generator().manual_seed(0), chunk_units=3).tolist()
    batches = [tuple(order[k : k + 10]) for k in range(0, 103, 10)]
    # each batch is 10 consecutive rows of a length-sorted chunk of 30; the 3 left over come last
    units = []
    for c in range(0, 103, 30):
        part = sorted(range(c, min(c + 30, 103)), key=lambda i: lengths[i])
        units += [tuple(part[k : k + 10]) for k in range(0, len(part), 10)]
    assert len(units[-1]) == 3 and batches[-1] == units[-1]
    assert sorted(batches[:-1]) == sorted(units[:-1]) and batches[:-1] != units[:-1]  # shuffled as units


def test_ddp_stride_split_keeps_batches_grouped():
    """Lightning's DistributedSamplerWrapper deals the sampler's order out by stride (rank r: positions r, r+W, ...);
    the sampler groups units of batch_size x world_size rows, so each rank's batches stay of similar length."""
    lengths, bs, world = skewed_lengths(960), 8, 2
    s = EpochShuffleSampler(960, 0, bs, lengths)
    order = s.order(0, world_size=world)
    one_process = padded_share(lengths, bs, s.order(0))
    for rank in range(world):
        assert padded_share(lengths, bs, order[rank::world]) < one_process + 0.05
    # grouping for one rank and splitting by stride would mix W groups in every batch
    naive = padded_share(lengths, bs, EpochShuffleSampler(960, 0, bs, lengths).order(0)[0::world])
    assert naive > padded_share(lengths, bs, order[0::world]) * 2


# ----------------------------------------------------------------------------------------- compile
def tiny_grounding(tokenizer):
    from gti.testing import make_tiny_llama
    from gti.tokens.vocab import NewTokens
    from gti.train.grounding import GroundingModule

    model = make_tiny_llama(len(tokenizer) + 4)
    new = NewTokens([f"<a_{i}>" for i in range(4)], len(tokenizer), [["x"]] * 4)
    module = GroundingModule(model, new, 1e-2, 0.0, 0)
    s = len(tokenizer)
    ids = torch.tensor([[1, 50, 60, s, s + 1, 2, 2], [1, 70, 80, 90, s + 2, s + 3, 2]])
    labels = ids.masked_fill(ids < s, -100)
    labels[:, -1] = torch.where(ids[:, -2] >= s, 2, -100)  # EOS after the SID
    return module, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile (inductor) needs a C++ compiler")
def test_compiled_grounding_step_gives_the_eager_loss(tokenizer):
    from gti.train.step import compile_training_forward, lean_lm_loss

    module, batch = tiny_grounding(tokenizer)
    rows = module.model.get_input_embeddings().rows
    eager = lean_lm_loss(module.model, batch)
    (g_eager,) = torch.autograd.grad(eager, rows)
    compile_training_forward(module)
    compiled = lean_lm_loss(module.model, batch, module.compiled_forward)
    (g_compiled,) = torch.autograd.grad(compiled, rows)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_compiled, g_eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_trainer_compile_wires_the_compiled_forward_into_the_step(tmp_path, tokenizer, monkeypatch, mode):
    """setup("fit") compiles the decoder's forward in trainer.compile_mode and the training step calls it; under
    CUDA graphs each step first marks a new step (torch.compile stubbed: fast)."""
    import gti.train.trainer
    from gti.train.step import compile_mode

    calls, modes, marks = [], [], []

    def fake_compile(fn, mode=None):
        modes.append(mode)

        def compiled(*args, **kw):
            calls.append(fn)
            return fn(*args, **kw)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(calls)))
    threads = torch.get_num_threads()
    monkeypatch.setattr(gti.train.trainer, "_first_step_reported", False)
    module, batch = tiny_grounding(tokenizer)
    t = TrainerConfig(max_steps=2, accelerator="cpu", log_every_n_steps=1, threads=1, compile=True, compile_mode=mode)
    module.compile_mode = compile_mode(t)
    trainer = gti.train.trainer.make_trainer(t, tmp_path, 2, enable_progress_bar=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    assert len(calls) == 2 and calls[0].__self__ is module.model.get_decoder() and modes == [mode]
    assert marks == ([0, 1] if mode == "reduce-overhead" else [])  # before each step's compiled forward
    assert torch.get_num_threads() == 1  # trainer.threads
    assert compile_mode(TrainerConfig(compile_mode=mode)) is None  # trainer.compile=false: nothing compiled
    torch.set_num_threads(threads)


def test_trainer_settings_are_checked_before_any_compute():
    from gti.core.checks import trainer_problems

    assert trainer_problems(TrainerConfig(compile_mode="reduce-overhead", pad_to_multiple_of=16)) == []
    problems = trainer_problems(TrainerConfig(compile_mode="fast", pad_to_multiple_of=0, checkpoint_every=-2))
    assert len(problems) == 3 and "trainer.compile_mode='fast'" in problems[0] and "reduce-overhead" in problems[0]
    assert "trainer.checkpoint_every=-2" in problems[1] and "-1 (none)" in problems[1]
    assert "trainer.pad_to_multiple_of=0" in problems[2]


def test_a_step_on_the_other_path_runs_eager(tmp_path, tokenizer, monkeypatch):
    """The forward compiled for the lean step is the decoder's: a step with lean_step switched off (bench_throughput
    alternates them) must run the whole model eagerly, not the compiled decoder, and get HF's loss."""
    from lightning.pytorch.callbacks import LambdaCallback

    import gti.train.trainer

    calls, losses = [], []

    def fake_compile(fn, mode=None):
        def compiled(*args, **kw):
            calls.append(fn)
            return fn(*args, **kw)

        return compiled

    def lean_first(trainer, module, batch, batch_idx):
        module.lean_step = batch_idx == 0

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(gti.train.trainer, "_first_step_reported", False)
    module, batch = tiny_grounding(tokenizer)
    module.compile_mode = "default"
    hooks = LambdaCallback(on_train_batch_start=lean_first, on_train_batch_end=lambda t, m, out, b, i: losses.append(out["loss"]))
    trainer = gti.train.trainer.make_trainer(TrainerConfig(max_steps=2, accelerator="cpu"), tmp_path, 2, callbacks=[hooks], enable_progress_bar=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    assert len(calls) == 1 and len(losses) == 2 and all(torch.isfinite(x) for x in losses)


# ----------------------------------------------------------------------------------------- trainer
def test_first_step_line_is_printed_once_per_process(tmp_path, tokenizer, monkeypatch, capsys):
    import re

    import gti.train.trainer

    monkeypatch.setattr(gti.train.trainer, "_first_step_reported", False)
    for _ in range(2):  # a second fit in the same process (gti.ground's unfreeze phase) prints nothing
        module, batch = tiny_grounding(tokenizer)
        trainer = gti.train.trainer.make_trainer(TrainerConfig(max_steps=1, accelerator="cpu"), tmp_path, 1, enable_progress_bar=False)
        trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[gti] first training step")]
    assert len(lines) == 1 and re.fullmatch(r"\[gti\] first training step began after \d+\.\ds", lines[0]), lines
    assert 0 < gti.train.trainer.process_age() < 24 * 3600


@pytest.mark.parametrize("every, written", [(0, True), (-1, False)])
def test_checkpoint_every_minus_one_writes_no_checkpoint(tmp_path, tokenizer, every, written):
    """0: last.ckpt at the epoch's end (resume=auto's starting point); -1: no checkpoint at all, not even
    Lightning's default one."""
    from gti.train.trainer import make_trainer

    module, batch = tiny_grounding(tokenizer)
    trainer = make_trainer(TrainerConfig(max_steps=2, accelerator="cpu", checkpoint_every=every), tmp_path, 2, enable_progress_bar=False)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 2, batch_size=None))
    assert trainer.global_step == 2
    assert sorted(p.name for p in tmp_path.rglob("*.ckpt")) == (["last.ckpt"] if written else [])


def test_num_nodes_reaches_the_trainer(tmp_path):
    from gti.train.trainer import make_trainer

    assert make_trainer(TrainerConfig(accelerator="cpu"), tmp_path, 1).num_nodes == 1
    trainer = make_trainer(TrainerConfig(accelerator="cpu", num_nodes=2), tmp_path, 1)
    assert trainer.num_nodes == 2 and type(trainer.strategy).__name__ == "DDPStrategy"


def test_progress_bar_reads_the_loss_only_at_logging_steps(tmp_path, tokenizer, monkeypatch):
    """The bar's metrics are .item() calls (a device sync on a GPU): every log_every_n_steps, not every step."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from gti.train.trainer import make_trainer

    reads = []
    real = TQDMProgressBar.get_metrics
    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, *a: reads.append(1) or real(self, *a))
    module, batch = tiny_grounding(tokenizer)
    trainer = make_trainer(TrainerConfig(max_steps=6, accelerator="cpu", log_every_n_steps=3), tmp_path, 6)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 6, batch_size=None))
    assert trainer.global_step == 6 and 1 <= len(reads) <= 3  # steps 3 and 6 (+ the epoch's end), not 6 reads
