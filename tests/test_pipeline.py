"""ground -> finetune -> test on a tiny random Llama with the real tokenizer (CPU, seconds)."""

import json

import pytest
import torch
from fixtures import spy_train_rows, write_toy_dataset

from gti.analysis.diagnostics import movement
from gti.core.config import DataConfig, EvalConfig, FinetuneConfig, GroundConfig, OptimConfig, TrainerConfig


def tiny_trainer(steps):
    return TrainerConfig(max_steps=steps, accelerator="cpu", log_every_n_steps=1)


@pytest.fixture()
def ground_run(tmp_path, tiny_model_dir):
    from gti.ground import run

    write_toy_dataset(tmp_path / "data")
    cfg = GroundConfig(
        model=tiny_model_dir,
        data=DataConfig(name="toy", root=str(tmp_path / "data")),
        optim=OptimConfig(lr=1e-2, batch_size=8),
        trainer=tiny_trainer(6),
        output_dir=str(tmp_path / "ground"),
    )
    return run(cfg), cfg


def test_ground_then_finetune(tmp_path, ground_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gti.finetune import run as finetune

    out, gcfg = ground_run
    assert (out / "model" / "config.json").is_file() and not out.with_name("ground.partial").exists()
    meta = json.loads((out / "gti.json").read_text())
    assert meta["stage"] == "ground" and meta["new_tokens"]["count"] == 4 + 3 + 2
    assert meta["steps"] == 6 and meta["final_loss"] is not None
    for f in ("diagnostics_init.json", "diagnostics_final.json", "spectrum_final.png", "cosine_final.png", "config.yaml"):
        assert (out / f).is_file(), f
    # reloads with plain transformers; the new rows moved away from the mean init, the old ones did not
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(gcfg.model)
    start = meta["new_tokens"]["start"]
    assert tok.convert_tokens_to_ids("<a_0>") >= start
    w, w0 = model.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert torch.equal(w[:start], w0[:start])
    new = w[start:]
    assert not torch.allclose(new, new.mean(0, keepdim=True).expand_as(new), atol=1e-4)
    # "moved" is measured from the mean init (every new row = the mean old row) to the saved rows
    init_rows = w0.detach().mean(0, keepdim=True).expand_as(new)
    assert meta["diagnostics"]["final"]["moved"] == pytest.approx(movement(init_rows, new), rel=1e-4)
    assert meta["diagnostics"]["final"]["moved"]["relative_change"] > 0 and "moved" not in meta["diagnostics"]["init"]

    cfg = FinetuneConfig(
        init_from=str(out),
        init="random",  # not used with init_from: the grounded rows' starting point is what gti.json records
        optim=OptimConfig(lr=1e-3, batch_size=8),
        trainer=tiny_trainer(4),
        eval=EvalConfig(num_beams=10, ks=[1, 5, 10], batch_size=4),
        output_dir=str(tmp_path / "ft"),
    )
    ft = finetune(cfg)
    assert json.loads((ft / "gti.json").read_text())["init"] == meta["init"] == "mean"
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["test"]["count"] == 9  # every test user once
    for split in ("valid", "test"):
        for k in (1, 5, 10):
            assert 0.0 <= metrics[split][f"recall@{k}"] <= 1.0
    assert set(metrics["baselines"]["test"]) == {"popularity", "random"}
    preds = [json.loads(line) for line in (ft / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["index"] for p in preds) == list(range(9))
    valid_items = set(range(12))
    assert all(set(p["items"]) <= valid_items and len(p["items"]) == len(set(p["items"])) for p in preds)
    assert (ft / "model" / "config.json").is_file()
    tuned = AutoModelForCausalLM.from_pretrained(ft / "model").get_input_embeddings().weight[start:]
    moved = json.loads((ft / "gti.json").read_text())["diagnostics"]["moved"]  # from the grounded rows it started at
    assert moved == pytest.approx(movement(new, tuned), rel=1e-4) and moved["cosine_to_start"] < 1.0


def test_finetune_with_history_loss_on_tiling_windows(tmp_path, ground_run, monkeypatch):
    from gti.finetune import run as finetune

    out, _ = ground_run
    seen = spy_train_rows(monkeypatch)
    cfg = FinetuneConfig(
        init_from=str(out),
        history_loss=True,
        train_per_user=2,
        data=DataConfig(name="toy", root=str(tmp_path / "data"), max_history=3),
        optim=OptimConfig(lr=1e-3, batch_size=4),
        trainer=tiny_trainer(3),
        eval=EvalConfig(num_beams=5, ks=[1, 5], batch_size=4),
        output_dir=str(tmp_path / "ft-history"),
    )
    metrics = json.loads((finetune(cfg) / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["test"]["count"] == 9
    # every history SID after the first is labelled, then the target's: the new-token labels of each row
    # are exactly those SIDs in order (without history_loss only the target's would be)
    ds, new, tok, train = seen["ds"], seen["new"], seen["tokenizer"], seen["train"]
    assert len(seen["rows"]) == len(train) == 9  # toy users have 3 training prefixes: one window of stride 3 each
    assert all(len(ex.history) == 3 for ex in train)
    for row, ex in zip(seen["rows"], train, strict=True):
        labelled = [t for t in row.labels if t != -100 and t >= new.start]
        expected = [t for i in (*ex.history[1:], ex.target) for t in tok.convert_tokens_to_ids(ds.index[i])]
        assert labelled == expected, (ex, tok.convert_ids_to_tokens(labelled))


def test_finetune_rejects_folder_that_is_not_stage1(tmp_path):
    from gti.core.errors import ConfigError
    from gti.finetune import run as finetune

    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match="not a gti run folder"):
        finetune(FinetuneConfig(init_from=str(tmp_path / "x")))


def test_ground_untied_model_keeps_old_rows_of_both_matrices(tmp_path, tiny_untied_model_dir):
    from transformers import AutoModelForCausalLM

    from gti.ground import run

    write_toy_dataset(tmp_path / "data")
    cfg = GroundConfig(
        model=tiny_untied_model_dir, data=DataConfig(name="toy", root=str(tmp_path / "data")),
        optim=OptimConfig(lr=1e-2, batch_size=8, weight_decay=0.1), trainer=tiny_trainer(4), output_dir=str(tmp_path / "g"),
    )  # fmt: skip
    out = run(cfg)
    start = json.loads((out / "gti.json").read_text())["new_tokens"]["start"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir)
    assert not model.config.tie_word_embeddings
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
        w, w0 = get(model), get(base)
        assert torch.equal(w[:start], w0[:start])  # old rows bit-identical, weight decay on
    inp, head = model.get_input_embeddings().weight[start:], model.get_output_embeddings().weight[start:]
    assert not torch.equal(inp, head)  # two tables, trained separately
