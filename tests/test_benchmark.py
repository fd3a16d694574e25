"""The benchmark harness on the tiny model: cells run through the real stage code, resume skips them."""

import json

from fixtures import write_toy_dataset

from gti.benchmark import BenchmarkConfig, run
from gti.config import DataConfig, EvalConfig, FinetuneConfig, GroundConfig, OptimConfig, TrainerConfig


def test_benchmark_report_and_resume(tmp_path, tiny_model_dir, capsys):
    write_toy_dataset(tmp_path / "data")
    data = DataConfig(name="toy", root=str(tmp_path / "data"))
    trainer = TrainerConfig(max_steps=3, accelerator="cpu", log_every_n_steps=1)
    cfg = BenchmarkConfig(
        methods=["mean", "gti-description"], seeds=[0, 1], single_seed=["mean"],
        ground=GroundConfig(model=tiny_model_dir, data=data, optim=OptimConfig(lr=1e-2, batch_size=8), trainer=trainer),
        finetune=FinetuneConfig(model=tiny_model_dir, data=data, optim=OptimConfig(batch_size=8), trainer=trainer,
                                eval=EvalConfig(num_beams=4, ks=[1, 5, 10], batch_size=4, valid=False)),
        output_dir=str(tmp_path / "bench"), ks=[1, 5, 10],
    )  # fmt: skip
    out = run(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["methods"]["mean"]["seeds"] == [0] and res["methods"]["gti-description"]["seeds"] == [0, 1]
    for m in res["methods"].values():
        assert 0.0 <= m["metrics"]["recall@10"][0] <= 1.0
    md = (out / "results.md").read_text()
    assert "| gti-description | 2 |" in md and "*popularity*" in md
    for f in ("spectra.png", "cosine_maps.png", "metrics.png"):
        assert (out / f).is_file()
    capsys.readouterr()
    run(cfg)  # everything finished: all cells are skipped
    assert capsys.readouterr().out.count("done, skipped") == 3
    cfg.report_only = True
    cfg.methods = ["mean", "gti-description", "random"]  # a method with no finished cell is left out
    assert "random" not in json.loads((run(cfg) / "results.json").read_text())["methods"]
