"""The benchmark harness on the tiny model: cells run through the real stage code, resume skips them."""

import json

from fixtures import write_toy_dataset

from gti.benchmark import BenchmarkConfig, list_diversity, run
from gti.config import DataConfig, EvalConfig, FinetuneConfig, GroundConfig, OptimConfig, TrainerConfig


def test_benchmark_report_and_resume(tmp_path, tiny_model_dir, capsys):
    write_toy_dataset(tmp_path / "data")
    data = DataConfig(name="toy", root=str(tmp_path / "data"))
    trainer = TrainerConfig(max_steps=3, accelerator="cpu", log_every_n_steps=1)
    cfg = BenchmarkConfig(
        methods=["mean", "gti-description"], seeds=[0, 1], single_seed=["mean"],
        ground=GroundConfig(model=tiny_model_dir, data=data, optim=OptimConfig(lr=1e-2, batch_size=8), trainer=trainer),
        finetune=FinetuneConfig(model=tiny_model_dir, data=data, optim=OptimConfig(batch_size=8), trainer=trainer,
                                eval=EvalConfig(num_beams=10, ks=[1, 5, 10], batch_size=4, valid=False)),
        output_dir=str(tmp_path / "bench"), ks=[1, 5, 10],
    )  # fmt: skip
    out = run(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["methods"]["mean"]["seeds"] == [0] and res["methods"]["gti-description"]["seeds"] == [0, 1]
    for m in res["methods"].values():
        assert 0.0 <= m["metrics"]["recall@10"][0] <= 1.0
    md = (out / "results.md").read_text()
    assert "| gti-description | 2 |" in md and "*popularity*" in md and "list of their own" in md
    for f in ("spectra.png", "cosine_maps.png", "metrics.png"):
        assert (out / f).is_file()
    capsys.readouterr()
    run(cfg)  # everything finished: all cells are skipped
    assert capsys.readouterr().out.count("done, skipped") == 3
    cfg.report_only = True
    cfg.methods = ["mean", "gti-description", "random"]  # a method with no finished cell is left out
    assert "random" not in json.loads((run(cfg) / "results.json").read_text())["methods"]


def test_list_diversity_tells_one_list_for_all_from_personal_lists(tmp_path):
    same, personal = tmp_path / "same.jsonl", tmp_path / "personal.jsonl"
    same.write_text("".join(json.dumps({"index": u, "items": [1, 2, 3]}) + "\n" for u in range(4)))
    personal.write_text("".join(json.dumps({"index": u, "items": [u, u + 1, 9]}) + "\n" for u in range(3))
                        + json.dumps({"index": 3, "items": [0, 1, 9]}) + "\n")  # fmt: skip
    assert list_diversity(same, k=3) == {"k": 3, "users": 4, "unique_list_share": 0.0, "items_covered": 3}
    d = list_diversity(personal, k=2)  # lists cut at k: (0,1) twice, (1,2), (2,3)
    assert d["unique_list_share"] == 0.5 and d["items_covered"] == 4
