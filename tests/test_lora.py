"""LoRA fine-tuning keeps a tied model tied and saves what it trained (docs/traps.md).

peft `modules_to_save=[embed_tokens, lm_head]` gave each matrix its own trainable copy: on a tied model
they drifted apart and the merged model was saved untied. LoRA now trains the new rows through the
grounding overlay: one table for a tied model, two for an untied one, old rows frozen.
"""

import json

import pytest
import torch
from fixtures import write_toy_dataset

from gti.core.config import DataConfig, EvalConfig, FinetuneConfig, LoraConfig, OptimConfig, TrainerConfig

NEW = ["<a_0>", "<a_1>", "<b_0>", "<b_1>"]


def embed_and_head(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_input_embeddings().weight, model.get_output_embeddings().weight


def probe_ids(eos: int, start: int) -> torch.Tensor:
    return torch.tensor([[eos, 100, start, start + 1, 200, start + 3, start + 2]])  # (1, 7), old and new ids


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_new_rows_and_merged_model_reloads_exactly(tmp_path, tokenizer, tied):
    from torch import nn
    from transformers import AutoModelForCausalLM

    from gti.testing import make_tiny_llama
    from gti.tokens.vocab import add_tokens, is_tied, resize, set_rows
    from gti.train.lora import apply_lora, merge_lora
    from gti.train.recommender import RecommenderModule

    model = make_tiny_llama(len(tokenizer), tied=tied)
    new = add_tokens(tokenizer, NEW, [["x"]] * len(NEW))
    resize(model, tokenizer)
    g = torch.Generator().manual_seed(0)
    set_rows(
        model, new, torch.randn(len(NEW), 64, generator=g), None if tied else torch.randn(len(NEW), 64, generator=g)
    )
    emb0, head0 = (w.detach().clone() for w in embed_and_head(model))
    s, e = new.start, new.start + len(new)

    cfg = FinetuneConfig(lora=LoraConfig(enabled=True), optim=OptimConfig(lr=1e-2, warmup_steps=0))
    model = apply_lora(model, cfg, new)
    # the module's optimiser sees exactly the LoRA adapters and the new-row table(s)
    opt = RecommenderModule(model, tokenizer, None, cfg).configure_optimizers()["optimizer"]
    seen = {id(p) for group in opt.param_groups for p in group["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in seen]
    rows = [n for n in names if n.endswith(".rows")]
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    assert len(rows) == (1 if tied else 2) and all("lora_" in n or n in rows for n in names)
    assert any("lora_B" in n for n in names)

    ids = probe_ids(tokenizer.eos_token_id, new.start)
    model.train()
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    live = logits(model, ids)
    # resume: a checkpoint's state_dict loads strictly into a freshly built LoRA model of the same base
    fresh = apply_lora(make_tiny_llama(len(tokenizer), tied=tied, seed=1), cfg, new)
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(logits(fresh, ids), live)

    merged = merge_lora(model)
    assert type(merged.get_input_embeddings()) is nn.Embedding and type(merged.get_output_embeddings()) is nn.Linear
    emb, head = embed_and_head(merged)
    assert is_tied(merged) == tied and merged.config.tie_word_embeddings == tied
    assert torch.allclose(logits(merged, ids), live, atol=1e-5)  # merging LoRA re-rounds the projections
    for w, w0 in ((emb, emb0), (head, head0)):
        assert torch.equal(w[:s], w0[:s]) and torch.equal(w[e:], w0[e:]), "old rows moved"
        assert (w[s:e] - w0[s:e]).abs().max() > 1e-3, "new rows did not train"

    merged.save_pretrained(tmp_path)
    re = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    re_emb, re_head = embed_and_head(re)
    assert re.config.tie_word_embeddings == tied and is_tied(re) == tied
    assert torch.equal(re_emb, emb) and torch.equal(re_head, head)
    assert torch.equal(logits(re, ids), logits(merged, ids))


@pytest.mark.parametrize("tied", [True, False])
def test_lora_finetune_run_saves_a_model_that_reloads_as_trained(
    tmp_path, monkeypatch, tiny_model_dir, tiny_untied_model_dir, tied
):
    """gti.finetune.run with lora.enabled: the saved folder is the trained model, tied when the base was."""
    from transformers import AutoModelForCausalLM

    import gti.finetune as ft
    import gti.train.lora
    from gti.tokens.overlay import overlay_rows
    from gti.tokens.vocab import is_tied

    seen = {}
    apply_lora, merge_lora = gti.train.lora.apply_lora, gti.train.lora.merge_lora

    def recording_apply(model, cfg, new):
        model = apply_lora(model, cfg, new)
        seen["new"], seen["init"] = new, overlay_rows(model)
        return model

    def recording_merge(model):  # the trained model as evaluated, just before merging and saving
        seen["rows"] = overlay_rows(model)
        seen["logits"] = logits(model, probe_ids(2, seen["new"].start))
        return merge_lora(model)

    monkeypatch.setattr(gti.train.lora, "apply_lora", recording_apply)  # gti.finetune.run imports them at call time
    monkeypatch.setattr(gti.train.lora, "merge_lora", recording_merge)
    base_dir = tiny_model_dir if tied else tiny_untied_model_dir
    write_toy_dataset(tmp_path / "data")
    cfg = FinetuneConfig(
        model=base_dir, init="mean", data=DataConfig(name="toy", root=str(tmp_path / "data")),
        lora=LoraConfig(enabled=True), optim=OptimConfig(lr=1e-2, batch_size=8, warmup_steps=0),
        trainer=TrainerConfig(max_steps=4, accelerator="cpu", log_every_n_steps=1),
        eval=EvalConfig(num_beams=5, ks=[1, 5], batch_size=4), output_dir=str(tmp_path / "ft"),
    )  # fmt: skip
    out = ft.run(cfg)

    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    emb, head = embed_and_head(model)
    assert model.config.tie_word_embeddings == tied
    assert is_tied(model) == tied
    if tied:
        assert torch.equal(emb, head)
    new = seen["new"]
    s, e = new.start, new.start + len(new)
    (init_in, init_out), (rows_in, rows_out) = seen["init"], seen["rows"]
    assert (rows_out is None) == tied  # one table for a tied model
    emb0, head0 = embed_and_head(base)
    checks = [(emb, emb0, init_in, rows_in)] + ([] if tied else [(head, head0, init_out, rows_out)])
    for w, w0, init, trained in checks:
        assert torch.equal(w[:s], w0[:s]), "old rows moved"
        assert torch.equal(w[s:e], trained), "saved rows are not the trained ones"
        assert (trained - init).abs().max() > 1e-3, "new rows did not train"
    assert torch.allclose(logits(model, probe_ids(2, s)), seen["logits"], atol=1e-5)


def test_overlay_head_keeps_the_bias_of_a_biased_head():
    """Heads with a bias (Phi): the new columns need it too, or merging changes the logits
    (the same gap as peft trainable tokens, huggingface/peft#3649)."""
    from torch import nn

    from gti.tokens.overlay import NewRowsHead

    torch.manual_seed(0)
    base = nn.Linear(16, 40, bias=True)  # (V=40, d=16), new ids 30..35
    rows = nn.Parameter(base.weight.detach()[30:36].clone())
    h = torch.randn(2, 3, 16)  # (B, T, d)
    with torch.no_grad():
        assert torch.allclose(NewRowsHead(base, 30, rows)(h), base(h), atol=1e-6)


def test_lora_bf16_true_validates_mid_fit_and_keeps_training(tmp_path, tiny_model_dir):
    """Ranking under bf16-true upcasts the weights inside Lightning's inference mode; the casts must not turn
    parameters into inference tensors, or the steps after a mid-fit validation and the merge would fail."""
    import gti.finetune as ft

    write_toy_dataset(tmp_path / "data")
    cfg = FinetuneConfig(
        model=tiny_model_dir, init="mean", data=DataConfig(name="toy", root=str(tmp_path / "data"), max_users=4),
        lora=LoraConfig(enabled=True), optim=OptimConfig(lr=1e-2, batch_size=4, warmup_steps=0),
        trainer=TrainerConfig(max_steps=3, accelerator="cpu", precision="bf16-true", val_check_interval=2, log_every_n_steps=1),
        eval=EvalConfig(num_beams=4, ks=[1, 4], batch_size=4, max_users=2), output_dir=str(tmp_path / "ft"),
    )  # fmt: skip
    out = ft.run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["test"]["count"] == 2
