"""The benchmark harness on the tiny model: cells run through the real stage code, resume skips them."""

import copy
import json
import subprocess
from pathlib import Path

import pytest
from fixtures import write_toy_dataset

import gti.experiments.runner
from gti.core.checks import eval_problems
from gti.core.config import (
    DataConfig,
    EvalConfig,
    FinetuneConfig,
    GroundConfig,
    OptimConfig,
    SasrecConfig,
    TrainerConfig,
    load_config,
)
from gti.core.errors import GtiError
from gti.experiments.benchmark import BenchmarkConfig, check_same_sids, run, run_cell, schedule
from gti.experiments.report import list_diversity

CONFIGS = Path(__file__).parent.parent / "configs"


def tiny_benchmark(tmp_path, model_dir, **kw) -> BenchmarkConfig:
    """Cells of the tiny model on the toy dataset: 3 steps a stage, one CPU thread per stage process."""
    write_toy_dataset(tmp_path / "data")
    data = DataConfig(name="toy", root=str(tmp_path / "data"))
    trainer = TrainerConfig(max_steps=3, accelerator="cpu", log_every_n_steps=1)
    return BenchmarkConfig(
        ground=GroundConfig(model=model_dir, data=data, optim=OptimConfig(lr=1e-2, batch_size=8), trainer=trainer),
        finetune=FinetuneConfig(model=model_dir, data=data, optim=OptimConfig(batch_size=8), trainer=trainer,
                                eval=EvalConfig(num_beams=10, ks=[1, 5, 10], batch_size=4, valid=False)),
        output_dir=str(tmp_path / "bench"), ks=[1, 5, 10], threads=1, **{"reference": [], **kw},
    )  # fmt: skip


def fake_reference(folder: Path, ranks: dict[int, int], targets: dict[int, int] | None = None) -> None:
    """A finished run folder as gti.sasrec writes it: gti.json, metrics.json, predictions.jsonl (`targets`: the
    held-out item of each user, 0 for users not in it)."""
    folder.mkdir(parents=True)
    (folder / "gti.json").write_text(json.dumps({"stage": "sasrec"}))
    recall = sum(0 <= r < 10 for r in ranks.values()) / len(ranks)
    (folder / "metrics.json").write_text(json.dumps({"test": {"recall@10": recall, "count": len(ranks)}}))
    rows = [{"index": u, "user": u, "target": (targets or {}).get(u, 0), "rank": r, "items": []} for u, r in ranks.items()]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_benchmark_report_and_resume(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_benchmark(tmp_path, tiny_model_dir, methods=["mean", "gti-description"], seeds=[0, 1], single_seed=["mean"])
    out = run(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["methods"]["mean"]["seeds"] == [0] and res["methods"]["gti-description"]["seeds"] == [0, 1]
    for m in res["methods"].values():
        assert 0.0 <= m["metrics"]["recall@10"][0] <= 1.0
    md = (out / "results.md").read_text()
    assert "| gti-description | 2 |" in md and "*popularity*" in md and "list of their own" in md
    # how far each stage moved the rows: from the init (grounding) and from the rows fine-tuning started at
    diag = res["methods"]["gti-description"]["runs"][0]["diagnostics"]
    moved = {stage: d.get("moved") for stage, d in diag.items()}
    assert moved["init"] is None and moved["grounded"]["relative_change"] > 0 and moved["finetuned"]["cosine_to_start"] < 1
    g = moved["grounded"]
    assert "| gti-description | grounded |" in md and f"| {g['relative_change']:.2f} / {g['cosine_to_start']:.3f} |" in md
    for f in ("spectra.png", "cosine_maps.png", "metrics.png"):
        assert (out / f).is_file()
    capsys.readouterr()
    run(cfg)  # everything finished: all cells are skipped
    assert capsys.readouterr().out.count("done, skipped") == 3
    neutral = copy.deepcopy(cfg)  # how a stage runs (logging, threads, speed) does not make a finished cell stale
    neutral.finetune.trainer.log_every_n_steps, neutral.finetune.trainer.threads = 7, 1
    neutral.ground.trainer.compile, neutral.ground.trainer.compile_mode = True, "reduce-overhead"
    neutral.ground.trainer.pad_to_multiple_of, neutral.finetune.eval.batch_size = 64, 3
    neutral.finetune.sids.data.name = "ml-1m"  # nor a section the stage never reads (cells saved before it mirrored data)
    run(neutral)
    assert capsys.readouterr().out.count("done, skipped") == 3
    changed = copy.deepcopy(cfg)  # a finished cell of other settings is not mixed into the table
    changed.finetune.optim.lr = 5e-3
    with pytest.raises(GtiError, match=r"is finished, but it ran with other settings(.|\n)*optim.lr: 0.001 then, 0.005 now"):
        run(changed)
    changed = copy.deepcopy(cfg)  # grounding settings too: the finetune YAML only names the grounded folder
    changed.ground.max_length = 48
    with pytest.raises(GtiError, match=r"ground is finished, but(.|\n)*max_length: 64 then, 48 now"):
        run(changed)
    cfg.report_only = True
    cfg.methods = ["mean", "gti-description", "random"]  # a method with no finished cell is left out
    assert "random" not in json.loads((run(cfg) / "results.json").read_text())["methods"]

    # the reference row (ranks 12 users, the arms 9) and a beam-vs-exact check of one cell
    arm = tmp_path / "bench" / "mean" / "seed0" / "finetune" / "predictions.jsonl"
    targets = {r["user"]: r["target"] for r in map(json.loads, arm.read_text().splitlines())}  # the same split
    fake_reference(tmp_path / "bench" / "sasrec" / "seed0" / "sasrec", {u: 0 for u in range(12)}, targets)
    metrics = tmp_path / "bench" / "mean" / "seed0" / "finetune" / "metrics.json"
    bve = {"users": 9, "top10_equal": 8, "top10_same_set": 9, "recall@10": {"beam": 0.5, "exact": 0.6},
           "ndcg@10": {"beam": 0.25, "exact": 0.3}}  # fmt: skip
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "beam_vs_exact": bve}))
    cfg.reference = ["sasrec"]
    out = run(cfg)
    res, md = json.loads((out / "results.json").read_text()), (out / "results.md").read_text()
    ref = res["references"]["sasrec"]["runs"][0]
    assert ref["users"] == 12 and ref["on_arm_users"] == {"users": 9, "recall@1": 1.0, "ndcg@1": 1.0, "recall@5": 1.0,
                                                          "ndcg@5": 1.0, "recall@10": 1.0, "ndcg@10": 1.0}  # fmt: skip
    assert {(d["a"], d["b"], d["seed"]) for d in res["paired"]} == {
        ("gti-description", "mean", 0), ("gti-description", "mean", "pooled"), ("sasrec", "mean", 0),
        ("sasrec", "mean", "pooled"), ("sasrec", "gti-description", 0), ("sasrec", "gti-description", "pooled"),
    }  # fmt: skip
    gd = next(d for d in res["paired"] if d["a"] == "gti-description" and d["seed"] == 0 and d["metric"] == "ndcg@10")
    runs = {m: r["runs"][0]["test"] for m, r in res["methods"].items()}  # per-user values average to the cells' metrics
    assert gd["a_mean"] == pytest.approx(runs["gti-description"]["ndcg@10"]) and gd["b_mean"] == pytest.approx(runs["mean"]["ndcg@10"])
    assert "*sasrec (reference), all 12 users*" in md and "*sasrec (reference), the arms' 9 users*" in md
    assert "| gti-description − mean | seed 0 | 9 |" in md and "| sasrec − mean | seed 0 | 9 |" in md
    assert "### Reading" in md and "In short:" in md
    assert "## Beam search vs exact ranking" in md and "| mean | 0 | 9 | 89% | 100% | 0.5000 / 0.6000 |" in md

    # run folders copied without their weights (scripts/gpu_check.sh packs them so): the report leaves their rows
    # out of the embedding plots, and without any weights it writes no such plots
    for f in (tmp_path / "bench").glob("*/seed*/finetune/model/*.safetensors"):
        f.unlink()
    (out / "spectra.png").unlink()
    md = (run(cfg) / "results.md").read_text()
    assert "| gti-description | 2 |" in md and not (out / "spectra.png").exists() and (out / "metrics.png").is_file()


def test_list_diversity_tells_one_list_for_all_from_personal_lists(tmp_path):
    same, personal = tmp_path / "same.jsonl", tmp_path / "personal.jsonl"
    same.write_text("".join(json.dumps({"index": u, "items": [1, 2, 3]}) + "\n" for u in range(4)))
    personal.write_text("".join(json.dumps({"index": u, "items": [u, u + 1, 9]}) + "\n" for u in range(3))
                        + json.dumps({"index": 3, "items": [0, 1, 9]}) + "\n")  # fmt: skip
    assert list_diversity(same, k=3) == {"k": 3, "users": 4, "unique_list_share": 0.0, "items_covered": 3}
    d = list_diversity(personal, k=2)  # lists cut at k: (0,1) twice, (1,2), (2,3)
    assert d["unique_list_share"] == 0.5 and d["items_covered"] == 4


def test_stage_processes_get_their_share_of_the_cores(tmp_path, monkeypatch):
    envs = []

    def fake_run(cmd, env, **kw):  # records each stage's environment instead of running it
        envs.append((cmd[2], env))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gti.experiments.runner.subprocess, "run", fake_run)
    run_cell(BenchmarkConfig(output_dir=str(tmp_path / "a"), threads=3, in_process=False), "gti-mean", 0)
    assert [m for m, _ in envs] == ["gti.ground", "gti.finetune"]
    for _, env in envs:
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3" and env["TOKENIZERS_PARALLELISM"] == "false"
    envs.clear()
    monkeypatch.setattr(gti.experiments.runner.os, "cpu_count", lambda: 5)
    run_cell(BenchmarkConfig(output_dir=str(tmp_path / "b"), parallel=2), "mean", 0)  # threads 0: 5 cores // 2
    assert envs[0][1]["OMP_NUM_THREADS"] == "2"
    envs.clear()
    run_cell(BenchmarkConfig(output_dir=str(tmp_path / "c"), parallel=8), "mean", 0)  # never below one thread
    assert envs[0][1]["OMP_NUM_THREADS"] == "1"


def test_sasrec_reference_runs_once_after_the_first_seed_on_the_arms_split(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_run(cmd, env, **kw):  # records each stage; a sasrec "run" leaves a finished run folder
        ran.append(cmd[2:])
        if cmd[2] == "gti.sasrec":
            fake_reference(Path(load_config(SasrecConfig, [cmd[3]]).output_dir), {0: 0})
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(gti.experiments.runner.subprocess, "run", fake_run)
    cfg = BenchmarkConfig(methods=["mean", "gti-mean"], seeds=[3, 4], single_seed=[], output_dir=str(tmp_path / "b"),
                          in_process=False)  # fmt: skip
    cfg.finetune.data = DataConfig(name="ml-1m", root="elsewhere", max_history=20, max_users=100)
    assert schedule(cfg) == [("mean", 3), ("gti-mean", 3), ("sasrec", 3), ("mean", 4), ("gti-mean", 4)]
    run_cell(cfg, "sasrec", 3)
    yaml = tmp_path / "b" / "sasrec" / "seed3" / "sasrec.yaml"
    assert ran == [["gti.sasrec", str(yaml)]]
    written = load_config(SasrecConfig, [str(yaml)])
    assert written.seed == 3 and written.output_dir == str(tmp_path / "b" / "sasrec" / "seed3" / "sasrec")
    d = written.data  # the arms' dataset and users, SASRec's own sequence length
    assert (d.name, d.root, d.max_users, d.max_history) == ("ml-1m", "elsewhere", 100, cfg.sasrec.data.max_history)
    assert written.eval.ks == cfg.finetune.eval.ks
    capsys.readouterr()
    run_cell(cfg, "sasrec", 3)  # finished: skipped
    assert len(ran) == 1 and "sasrec seed 3: done, skipped" in capsys.readouterr().out
    cfg.reference = ["bert4rec"]
    with pytest.raises(GtiError, match="reference: unknown 'bert4rec'; known: sasrec"):
        run(cfg)


def test_parallel_cells_finish_and_a_failed_one_names_its_log(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_benchmark(tmp_path, tiny_model_dir, methods=["random", "mean", "gti-mean"], seeds=[0], parallel=2)
    cfg.ground.max_length = 4  # gti.ground rejects it at start-up: gti-mean fails, random and mean do not
    with pytest.raises(GtiError, match="1 of 3 cells failed") as e:
        run(cfg)
    bench = tmp_path / "bench"
    log = bench / "gti-mean" / "seed0" / "cell.log"
    assert str(log) in str(e.value) and "max_length >= 8" in log.read_text()
    for method in ("random", "mean"):  # both ran to the end, their output in their own log
        assert (bench / method / "seed0" / "finetune" / "metrics.json").is_file()
        assert "[gti.finetune] done" in (bench / method / "seed0" / "cell.log").read_text()
    out = capsys.readouterr().out
    assert f"gti-mean seed 0: FAILED: gti.ground exited with 2; log: {log}" in out
    assert "random seed 0: finished" in out and "mean seed 0: finished" in out


def test_stages_inside_the_process_compute_what_stage_processes_do(tmp_path, tiny_model_dir, capsys):
    """in_process=true (the default) runs each stage's main() here: the same numbers as a process per stage, the
    stage's model let go afterwards and the caller's thread count restored."""
    import gc

    import torch
    from safetensors.torch import load_file
    from transformers import PreTrainedModel

    threads = torch.get_num_threads()
    folders = {}
    for here in (True, False):
        cfg = tiny_benchmark(tmp_path, tiny_model_dir, methods=["gti-mean"], seeds=[0], in_process=here)
        cfg.output_dir = str(tmp_path / f"bench-{here}")
        run(cfg)
        folders[here] = Path(cfg.output_dir) / "gti-mean" / "seed0"
        if here:
            assert "1 CPU threads in this process" in capsys.readouterr().out
            gc.collect()
            assert not [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
            assert torch.get_num_threads() == threads
    metrics = [json.loads((folders[h] / "finetune" / "metrics.json").read_text()) for h in (True, False)]
    assert metrics[0]["test"] == metrics[1]["test"]
    for stage in ("ground", "finetune"):
        a, b = (load_file(folders[h] / stage / "model" / "model.safetensors") for h in (True, False))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only: the resettable resident peak")
def test_each_stage_in_the_process_reports_its_own_peak_memory():
    import numpy as np

    from gti.core.runs import peak_memory_mb, reset_peak_memory

    big = np.ones(400 * 2**20 // 8)  # 400 MB touched: an earlier stage's peak
    earlier = peak_memory_mb()["peak_rss_mb"]
    del big
    reset_peak_memory()
    assert peak_memory_mb()["peak_rss_mb"] < earlier - 300


def test_a_stage_failing_inside_the_process_fails_its_cell_only(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import gti.finetune

    def crash(cfg):
        if cfg.init == "random":
            raise RuntimeError("shape mismatch")  # a crash, not a user error
        return real(cfg)

    real = gti.finetune.run
    monkeypatch.setattr(gti.finetune, "run", crash)
    cfg = tiny_benchmark(tmp_path, tiny_model_dir, methods=["random", "mean", "gti-mean"], seeds=[0])
    cfg.ground.max_length = 4  # a user error at gti.ground's start-up
    with pytest.raises(GtiError, match="2 of 3 cells failed"):
        run(cfg)
    captured = capsys.readouterr()
    assert "random seed 0: FAILED: gti.finetune exited with 1" in captured.out
    assert "gti-mean seed 0: FAILED: gti.ground exited with 2" in captured.out
    assert "RuntimeError: shape mismatch" in captured.err and "max_length >= 8" in captured.err
    assert (tmp_path / "bench" / "mean" / "seed0" / "finetune" / "metrics.json").is_file()


def test_what_a_process_cannot_survive_stops_the_benchmark(tmp_path, monkeypatch):
    """A GPU fault leaves CUDA unusable in the process, and Ctrl-C caught by Lightning (which then ignores further
    Ctrl-C) is still an interrupt: neither lets a later cell start in-process. Other ranks never start in it."""
    import signal
    import sys

    import gti.finetune

    ran = []

    def fault(cfg):
        ran.append(cfg.init)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def interrupted(cfg):  # what Lightning does on Ctrl-C inside fit
        ran.append(cfg.init)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(1)

    cfg = BenchmarkConfig(methods=["random", "mean"], seeds=[0], output_dir=str(tmp_path / "b"), reference=[])
    monkeypatch.setattr(gti.finetune, "run", fault)
    with pytest.raises(GtiError, match="GPU fault inside this process(.|\n)*in_process=false"):
        run(cfg)
    assert ran == ["random"]
    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(gti.finetune, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    assert ran == ["random", "random"] and signal.getsignal(signal.SIGINT) is handler

    processes = []  # two devices: DDP, whose launcher would re-run this process's command line
    monkeypatch.setattr(gti.experiments.runner.subprocess, "run", lambda cmd, **kw: processes.append(cmd[2]) or
                        subprocess.CompletedProcess(cmd, 0))  # fmt: skip
    cfg.finetune.trainer.devices = 2
    run_cell(cfg, "mean", 0)
    assert processes == ["gti.finetune"] and ran == ["random", "random"]


def test_quick_gpu_config_is_ready_to_run():
    cfg = load_config(BenchmarkConfig, [str(CONFIGS / "benchmark-gpu-quick.yaml")])
    assert eval_problems(cfg.finetune.eval) == []
    check_same_sids(cfg)  # gti-mean's grounding and the fine-tunings share one SID index
    ev = cfg.finetune.eval
    assert ev.max_users == 0 and not ev.valid and ev.precision == "fp32" and cfg.parallel == 1
    assert cfg.seeds == [0] and {"random", "mean", "gti-mean", "gti-description", "gti-random"} == set(cfg.methods)
