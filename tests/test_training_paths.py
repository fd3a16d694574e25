"""Training paths beyond the default run: fine-tuning resume, the unfreeze phase, multitask rows,
tokens_file grounding and gradient accumulation (tiny random Llama, toy dataset, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from fixtures import add_callbacks, spy_train_rows, write_toy_dataset

from gti.core.config import (
    DataConfig,
    FinetuneConfig,
    GroundConfig,
    GroundStageConfig,
    OptimConfig,
    TrainerConfig,
    load_config,
)


def toy_data(tmp_path: Path) -> DataConfig:
    write_toy_dataset(tmp_path / "data")  # 9 users x 6 items, 12 items, SIDs of 3 tokens (9 new tokens)
    return DataConfig(name="toy", root=str(tmp_path / "data"))


def ground_cfg(tmp_path, model_dir, out: str, **kw) -> GroundConfig:
    kw.setdefault("trainer", TrainerConfig(max_steps=4, accelerator="cpu", log_every_n_steps=1))
    kw.setdefault("optim", OptimConfig(lr=1e-2, batch_size=8))
    return GroundConfig(
        model=model_dir, data=toy_data(tmp_path), diagnostics=False, output_dir=str(tmp_path / out), **kw
    )


class CountBatches(L.Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, *args):
        self.batches += 1


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def new_rows(run: Path) -> tuple[torch.Tensor, dict]:
    meta = json.loads((run / "gti.json").read_text())
    s, n = meta["new_tokens"]["start"], meta["new_tokens"]["count"]
    return weights(run / "model")["model.embed_tokens.weight"][s : s + n], meta


def init_new_rows(tmp_path, model_dir, tokens_file: str | None = None):
    """The new rows a run starts from (init=mean, seed 0), rebuilt in-process; also the model and tokens."""
    from gti.data.dataset import load_dataset
    from gti.tokens.extend import extend_model

    ds = load_dataset(tmp_path / "data", "toy", need_index=True)
    model, tokenizer, new = extend_model(model_dir, ds, "mean", {}, tokens_file, 0)
    return model.get_input_embeddings().weight[new.start :].detach(), model, tokenizer, new


# ----------------------------------------------------------------------------------------- resume
class Crash(L.Callback):
    """Dies at a fixed step like a killed job: no final checkpoint, the run left in `<out>.partial/`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise SystemError(f"simulated crash at step {self.step}")


def test_finetune_crash_and_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch):
    """In-process, so it costs no interpreter start; test_scale kills a real gti.ground process with SIGKILL."""
    from gti.finetune import run as finetune

    toy_data(tmp_path)
    # 4 users x 3 training rows / batch 4 = 3 batches an epoch; 5 steps cross an epoch; checkpoints at 2 and 4
    args = [
        f"model={tiny_model_dir}", "data.name=toy", f"data.root={tmp_path / 'data'}", "data.max_users=4", "init=mean",
        "optim.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=3", "trainer.max_steps=5",
        "trainer.checkpoint_every=2", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1",
        "eval.num_beams=4", "eval.ks=[1,4]", "eval.batch_size=4", "eval.valid=false",
    ]  # fmt: skip
    ref = finetune(load_config(FinetuneConfig, [*args, f"output_dir={tmp_path / 'ref'}"]))

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        add_callbacks(m, Crash(step=3))
        with pytest.raises(SystemError, match="simulated crash"):
            finetune(load_config(FinetuneConfig, [*args, f"output_dir={out}"]))
    last = out.with_name("run.partial") / "checkpoints" / "last.ckpt"
    assert not out.exists() and last.is_file()
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2  # mid-epoch (batch 2 of 3)

    counter = CountBatches()
    add_callbacks(monkeypatch, counter)
    resumed = finetune(load_config(FinetuneConfig, [*args, f"output_dir={out}", "resume=auto"]))
    assert counter.batches == 5 - 2  # it continued from step 2, not from scratch
    m_ref, m_res = (json.loads((d / "metrics.json").read_text()) for d in (ref, resumed))
    assert m_res["steps"] == m_ref["steps"] == 5
    assert m_res["test"] == m_ref["test"] and m_res["test"]["count"] == 4
    assert (resumed / "predictions.jsonl").read_text() == (ref / "predictions.jsonl").read_text()
    w_ref, w_res = weights(ref / "model"), weights(resumed / "model")
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), f"{k} differs after resume"


# ----------------------------------------------------------------------------------------- unfreeze
def test_ground_unfreeze_phase_trains_old_rows_and_reloads(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.ground import run
    from gti.tokens.vocab import is_tied

    cfg = ground_cfg(
        tmp_path,
        tiny_model_dir,
        "g",
        ground=GroundStageConfig(templates=["title2sid"], unfreeze_steps=2, unfreeze_lr=1e-3),
    )
    out = run(cfg)
    start = json.loads((out / "gti.json").read_text())["new_tokens"]["start"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    w, w0 = model.state_dict(), base.state_dict()
    # phase 2 trains everything: old embedding rows and the transformer weights moved too
    assert not torch.equal(w["model.embed_tokens.weight"][:start], w0["model.embed_tokens.weight"])
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert not torch.equal(w[k], w0[k]), f"{k} did not train in the unfreeze phase"
    # the saved folder is a plain, still tied HF model with the extended tokenizer
    assert model.config.tie_word_embeddings
    assert is_tied(model)
    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok("Which item is <a_1><b_2><c_1>?", return_tensors="pt").input_ids
    assert ids.max() >= start
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# ----------------------------------------------------------------------------------------- multitask
def test_finetune_multitask_trains_on_grounding_rows_too(tmp_path, tiny_model_dir, monkeypatch):
    from gti.core.config import EvalConfig
    from gti.finetune import run as finetune
    from gti.train.templates import GROUNDING_TEMPLATES

    seen = spy_train_rows(monkeypatch)
    cfg = FinetuneConfig(
        model=tiny_model_dir, data=toy_data(tmp_path), init="mean", multitask=True,
        optim=OptimConfig(lr=1e-3, batch_size=8), trainer=TrainerConfig(max_steps=2, accelerator="cpu", log_every_n_steps=1),
        eval=EvalConfig(num_beams=4, ks=[1, 4], batch_size=4, max_users=3, valid=False), output_dir=str(tmp_path / "ft"),
    )  # fmt: skip
    metrics = json.loads((finetune(cfg) / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["test"]["count"] == 3
    rows, train, tok = seen["rows"], seen["train"], seen["tokenizer"]
    assert len(train) == 9 * 3  # 3 training prefixes per toy user
    assert len(rows) == len(train) + 12 * len(GROUNDING_TEMPLATES)  # every item in every grounding task
    texts = [tok.decode(r.input_ids) for r in rows[len(train) :]]
    with_title = [name for name, (prompt, response) in GROUNDING_TEMPLATES.items() if "{title}" in prompt + response]
    assert sum("Movie 7 (1997)" in t for t in texts) == len(with_title)  # item 7's grounding rows are there


# ----------------------------------------------------------------------------------------- tokens_file
def log_prob_of_response(model, fmt, prompt: str, response: str) -> float:
    enc = fmt.encode(prompt, response, 64)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    target, keep = labels[0, 1:], labels[0, 1:] != -100
    return float(logp[keep.nonzero().flatten(), target[keep]].sum())


def test_ground_tokens_file_adds_grounds_and_saves_tokens(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.ground import run
    from gti.train.grounding import TOKEN_TEMPLATES
    from gti.train.templates import PromptFormatter, render

    extra = {
        "<genre_comedy>": "a funny film that makes people laugh",
        "<genre_horror>": "a scary film full of monsters",
    }
    tokens_file = tmp_path / "tokens.jsonl"
    tokens_file.write_text("".join(json.dumps({"token": t, "description": d}) + "\n" for t, d in extra.items()))
    # 12 title2sid rows + 2 rows per extra token = 16 rows: 2 batches an epoch, 6 steps = 3 epochs
    cfg = ground_cfg(
        tmp_path, tiny_model_dir, "g", tokens_file=str(tokens_file), ground=GroundStageConfig(templates=["title2sid"]),
        trainer=TrainerConfig(max_steps=6, accelerator="cpu", log_every_n_steps=1),
    )  # fmt: skip
    out = run(cfg)
    rows, meta = new_rows(out)
    assert meta["new_tokens"]["count"] == 9 + 2 and meta["new_tokens"]["tokens"][-2:] == list(extra)
    tok = AutoTokenizer.from_pretrained(out / "model")
    start = meta["new_tokens"]["start"]
    ids = tok.convert_tokens_to_ids(list(extra))
    assert ids == [start + 9, start + 10]
    for t, i in zip(extra, ids):
        assert tok(f"see {t} here", add_special_tokens=False).input_ids.count(i) == 1  # one token, not split

    init_rows, init_model, init_tok, new = init_new_rows(tmp_path, tiny_model_dir, str(tokens_file))
    assert new.tokens == meta["new_tokens"]["tokens"]
    assert (rows[-2:] != init_rows[-2:]).any(dim=1).all()  # the extra tokens' rows trained and were saved
    # grounded: the model now names each token from its description far better than at init
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    for t, d in extra.items():
        prompt, response = render(TOKEN_TEMPLATES["desc2token"], token=t, description=d)
        before = log_prob_of_response(init_model, PromptFormatter(init_tok), prompt, response)
        after = log_prob_of_response(model, PromptFormatter(tok), prompt, response)
        assert after > before + 1.0, (t, before, after)


# ----------------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_counts_optimizer_steps_and_equals_a_bigger_batch(tmp_path, tiny_model_dir):
    from gti.ground import run

    # title2sid rows all label 4 tokens (3 SID tokens + EOS): the mean loss of a batch of 4 equals the
    # mean of the losses of its two halves, so 2 accumulated batches of 2 = 1 batch of 4, step for step
    stage = GroundStageConfig(templates=["title2sid"])
    one_epoch = dict(max_steps=-1, max_epochs=1, accelerator="cpu", log_every_n_steps=1)
    big = run(ground_cfg(tmp_path, tiny_model_dir, "big", ground=stage, optim=OptimConfig(lr=1e-2, batch_size=4),
                         trainer=TrainerConfig(**one_epoch)))  # fmt: skip
    acc = run(ground_cfg(tmp_path, tiny_model_dir, "acc", ground=stage, optim=OptimConfig(lr=1e-2, batch_size=2),
                         trainer=TrainerConfig(accumulate_grad_batches=2, **one_epoch)))  # fmt: skip
    rows_big, meta_big = new_rows(big)
    rows_acc, meta_acc = new_rows(acc)
    assert meta_big["grounding_examples"] == meta_acc["grounding_examples"] == 12
    assert meta_big["steps"] == 12 // 4 and meta_acc["steps"] == 12 // 2 // 2  # optimizer steps, not batches
    init = init_new_rows(tmp_path, tiny_model_dir)[0]
    assert (rows_big - init).abs().max() > 1e-3  # it trained: the equality below is not two untouched tables
    assert torch.allclose(rows_acc, rows_big, atol=1e-5), (rows_acc - rows_big).abs().max()
