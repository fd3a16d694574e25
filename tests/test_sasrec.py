"""The SASRec reference: causal model, full-softmax training, full-catalogue ranking scored by the shared metric code,
and a run folder like the stages'."""

from __future__ import annotations

import json

import pytest
import torch

from gti.core.config import DataConfig, EvalConfig, OptimConfig, SasrecConfig, TrainerConfig, load_config
from gti.core.errors import ConfigError
from gti.data.dataset import Example, leave_one_out, load_dataset
from gti.rank.metrics import RankingMetrics, ndcg_at
from gti.train.sasrec import (
    Padded,
    SasrecModel,
    SasrecModule,
    catalogue_ranking,
    collate_eval,
    collate_train,
    config_problems,
    load_model,
    target_positions,
    train_windows,
    unseen_scores,
)
from tests.fixtures import add_callbacks, write_toy_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread, and far slower on several when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shapes_and_causality():
    torch.manual_seed(0)
    model = SasrecModel(num_items=10, hidden=16, blocks=2, heads=2, dropout=0.2, max_len=6).eval()
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])  # shifted ids, 0 = padding
    hidden = model(seq)
    assert hidden.shape == (2, 6, 16) and model.scores(hidden).shape == (2, 6, 10)
    assert torch.isfinite(hidden).all()  # padding rows too (they attend to themselves only)
    for t in range(5):  # a later item never changes an earlier position's output
        changed = seq.clone()
        changed[:, t + 1 :] = 9
        after = model(changed)
        assert torch.equal(after[:, : t + 1], hidden[:, : t + 1])
        assert not torch.allclose(after[:, t + 1 :], hidden[:, t + 1 :])
    # padding is invisible: without position embeddings, a left-padded sequence reads as the bare one
    with torch.no_grad():
        model.positions.weight.zero_()
    assert torch.allclose(model(seq[:1])[:, 2:], model(seq[:1, 2:]), atol=1e-6)


def test_train_windows_cover_every_training_target_once():
    inter = {0: list(range(10, 22)), 1: [1, 2, 3], 2: [4, 5, 6, 7]}  # user 0: 12 items, training part 10..19
    windows = train_windows(inter, max_len=4)
    assert windows == [[15, 16, 17, 18, 19], [11, 12, 13, 14, 15], [10, 11], [4, 5]]
    targets = sorted(i for w in windows for i in w[1:])
    split = leave_one_out(inter, max_history=4)["train"]  # the LM stages' training targets
    assert targets == sorted(ex.target for ex in split)
    batch = collate_train(windows, max_len=4)
    assert batch["seq"][2].tolist() == [0, 0, 0, 11] and batch["target"][2].tolist() == [-100, -100, -100, 11]
    assert batch["seq"][0].tolist() == [16, 17, 18, 19] and batch["target"][0].tolist() == [16, 17, 18, 19]


def test_padded_once_batches_are_the_per_batch_ones():
    """The stage pads every window once and indexes batches out of it: the same batches as padding each batch."""
    from torch.utils.data import DataLoader

    inter = {u: list(range(u, u + 3 + u % 7)) for u in range(9)}
    windows = train_windows(inter, max_len=4)
    loader = DataLoader(Padded(collate_train(windows, 4)), batch_size=3, collate_fn=target_positions)
    batches = list(loader)
    assert len(batches) == -(-len(windows) // 3)
    for i, batch in enumerate(batches):
        expected = target_positions(collate_train(windows[3 * i : 3 * i + 3], max_len=4))
        assert batch.keys() == expected.keys() == {"seq", "target", "rows", "cols"}
        assert all(torch.equal(batch[k], expected[k]) for k in batch)
        assert torch.equal(batch["target"][batch["rows"], batch["cols"]], batch["target"][batch["target"] >= 0])


def test_loss_decreases_on_toy_sequences():
    torch.manual_seed(0)
    inter = {u: [(u + k) % 12 for k in range(8)] for u in range(12)}  # each item is followed by the next id
    batch = target_positions(collate_train(train_windows(inter, max_len=5), max_len=5))
    cfg = SasrecConfig(hidden=16, dropout=0.0)
    module = SasrecModule(SasrecModel(12, hidden=16, dropout=0.0, max_len=5), cfg)
    opt = module.configure_optimizers()
    first = module.loss(batch).item()
    for _ in range(40):
        opt.zero_grad()
        module.loss(batch).backward()
        opt.step()
    assert module.loss(batch).item() < 0.5 * first


def test_ranking_and_metrics_by_hand():
    scores = torch.tensor([
        [0.1, 0.9, 0.5, 0.3, 0.7],  # order 1, 4, 2, 3, 0: target 2 at rank 2
        [0.8, 0.1, 0.2, 0.3, 0.4],  # order 0, 4, 3, 2, 1: target 1 at rank 4
        [0.5, 0.5, 0.1, 0.0, 0.2],  # tie: the smaller id first, order 0, 1, 4, 2, 3: target 0 at rank 0
    ])  # fmt: skip
    ranks, top = catalogue_ranking(scores, torch.tensor([2, 1, 0]), k=3)
    assert ranks.tolist() == [2, 4, 0] and top.tolist() == [[1, 4, 2], [0, 4, 3], [0, 1, 4]]
    m = RankingMetrics((1, 3))
    m.update(torch.arange(3), ranks)
    out = m.compute()
    assert out["recall@1"] == pytest.approx(1 / 3) and out["recall@3"] == pytest.approx(2 / 3)
    assert out["ndcg@3"] == pytest.approx((1 / 2 + 0 + 1) / 3)  # 1/log2(2 + 2) = 1/2 and 1/log2(0 + 2) = 1
    assert out["count"] == 3


def test_ranking_is_over_the_whole_catalogue():
    # every item can be recommended, the ones in the history too: nothing is filtered out
    model = SasrecModel(num_items=7, hidden=8, max_len=4).eval()
    batch = collate_eval([Example(0, 0, (1, 2, 3), 4)], max_len=4)
    scores = model.scores(model(batch["seq"])[:, -1])
    assert scores.shape == (1, 7)
    ranks, order = catalogue_ranking(scores, batch["target"], k=7)
    assert sorted(order[0].tolist()) == list(range(7)) and 0 <= ranks.item() < 7


def test_seen_filter_removes_the_whole_history_but_not_the_target():
    """The published ranking: every item the user has seen is out, beyond the max_len the model reads too."""
    examples = [Example(0, 0, (1, 2, 3, 4, 5, 6), 4), Example(1, 1, (0,), 6)]  # user 0's target 4 is also in its history
    batch = collate_eval(examples, max_len=2)
    assert batch["seq"].tolist() == [[6, 7], [0, 1]] and batch["seen"].tolist() == [[1, 2, 3, 4, 5, 6], [-1] * 5 + [0]]
    scores = torch.tensor([[7.0, 6, 5, 4, 3, 2, 1], [7.0, 6, 5, 4, 3, 2, 1]])
    masked = unseen_scores(scores, batch["seen"], batch["target"])
    inf = float("-inf")
    assert masked.tolist() == [[7, inf, inf, inf, 3, inf, inf], [inf, 6, 5, 4, 3, 2, 1]]
    unseen, _ = catalogue_ranking(masked, batch["target"], k=3)
    ranks, _ = catalogue_ranking(scores, batch["target"], k=3)
    assert ranks.tolist() == [4, 6] and unseen.tolist() == [1, 5]


def test_config_problems_listed_at_once():
    cfg = SasrecConfig(hidden=10, heads=3, blocks=0, monitor="ndcg@50", data=DataConfig(max_history=0))
    problems = config_problems(cfg)
    assert len(problems) == 4 and any("monitor" in p for p in problems)
    assert not config_problems(load_config(SasrecConfig, ["configs/sasrec.yaml"]))


def toy_config(tmp_path, **kw) -> SasrecConfig:
    write_toy_dataset(tmp_path / "data", users=12, items=12)
    return SasrecConfig(
        data=DataConfig(name="toy", root=str(tmp_path / "data"), max_history=4),
        hidden=16, heads=2, dropout=0.1, patience=2,
        optim=OptimConfig(lr=1e-2, batch_size=4),
        trainer=TrainerConfig(max_epochs=4, accelerator="cpu", gradient_clip_val=0.0, log_every_n_steps=1),
        eval=EvalConfig(ks=[1, 5, 10], batch_size=5),
        output_dir=str(tmp_path / "runs" / "sasrec"), **kw,
    )  # fmt: skip


def test_run_writes_a_sasrec_folder(tmp_path):
    from gti.core.runs import read_run
    from gti.sasrec import run

    cfg = toy_config(tmp_path)
    out = run(cfg)
    run_ = read_run(out, "sasrec")
    assert run_.dataset == (str(tmp_path / "data"), "toy") and run_.meta["seed"] == 0 and "torch" in run_.meta["versions"]
    assert not (out / "checkpoints").exists() and not out.with_name(out.name + ".partial").exists()

    metrics = json.loads((out / "metrics.json").read_text())
    finetune_keys = {"valid", "test", "baselines", "steps", "wall_time_s"}  # gti.finetune's, where they overlap
    assert finetune_keys | {"epochs", "best_epoch"} <= metrics.keys()
    for split in ("valid", "test", "valid_unseen", "test_unseen"):
        assert {"recall@10", "ndcg@10", "count"} <= metrics[split].keys() and metrics[split]["count"] == 12
    assert metrics["test_unseen"]["ndcg@10"] >= metrics["test"]["ndcg@10"]  # fewer items above each target
    assert metrics["baselines"]["test"].keys() == {"popularity", "random"}
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"] == len(metrics["history"]) <= 4
    best = metrics["history"][metrics["best_epoch"] - 1]  # the restored checkpoint is the best epoch's
    assert best["ndcg@10"] == max(h["ndcg@10"] for h in metrics["history"])
    assert metrics["valid"]["ndcg@10"] == pytest.approx(best["ndcg@10"])

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    test = leave_one_out(load_dataset(tmp_path / "data", "toy").inter, 4)["test"]
    assert [(p["index"], p["user"], p["target"]) for p in preds] == [(ex.index, ex.user, ex.target) for ex in test]
    assert all(len(p["items"]) == 10 and 0 <= p["rank"] < 12 for p in preds)  # ranks over all 12 items, not the top 10
    assert all(p["rank"] == p["items"].index(p["target"]) for p in preds if p["rank"] < 10)
    recall = sum(p["rank"] < 10 for p in preds) / len(preds)  # the metrics are the predictions' ranks, scored by hand
    ndcg = sum(ndcg_at(p["rank"], 10) for p in preds) / len(preds)
    assert metrics["test"]["recall@10"] == pytest.approx(recall) and metrics["test"]["ndcg@10"] == pytest.approx(ndcg)

    # the saved weights are the tested ones: reloaded, they rank the test users the same way
    model = load_model(out / "model")
    assert json.loads((out / "model" / "config.json").read_text())["max_len"] == 4
    batch = collate_eval(test, max_len=4)
    ranks, _ = catalogue_ranking(model.scores(model(batch["seq"])[:, -1]), batch["target"], 10)
    assert ranks.tolist() == [p["rank"] for p in preds]


def test_run_rejects_bad_config_before_compute(tmp_path):
    from gti.sasrec import run

    with pytest.raises(ConfigError, match="monitor"):
        run(toy_config(tmp_path, monitor="recall@50"))
    assert not (tmp_path / "runs").exists()


def test_resume_continues_after_the_last_finished_epoch(tmp_path, monkeypatch):
    """A run killed in epoch 3 of 4 continues there under resume=auto, its epoch history kept whole."""
    from dataclasses import replace

    import lightning as L

    from gti.sasrec import run

    class Crash(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 2:
                raise SystemError("simulated crash in epoch 3")

    class CountEpochs(L.Callback):
        epochs = 0

        def on_train_epoch_end(self, trainer, module):
            self.epochs += 1

    cfg = replace(toy_config(tmp_path), patience=10)  # no early stop: all 4 epochs
    with monkeypatch.context() as m:
        add_callbacks(m, Crash())
        with pytest.raises(SystemError, match="simulated crash"):
            run(cfg)
    last = tmp_path / "runs" / "sasrec.partial" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and len(saved["sasrec_history"]) == 2  # epochs 1 and 2 finished, both validated

    add_callbacks(monkeypatch, counter := CountEpochs())
    out = run(replace(cfg, resume="auto"))
    assert counter.epochs == 2  # epochs 3 and 4, not a fresh start
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4] and metrics["epochs"] == 4
    best = max(metrics["history"], key=lambda h: h["ndcg@10"])
    assert metrics["best_epoch"] == best["epoch"] and metrics["valid"]["ndcg@10"] == pytest.approx(best["ndcg@10"])
