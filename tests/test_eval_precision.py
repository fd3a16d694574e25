"""Ranking does not depend on trainer.precision (docs/traps.md); eval.ks must fit in the beams."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import write_toy_dataset

import gti.train.recommender
from gti.core.config import DataConfig, EvalConfig, FinetuneConfig, TrainerConfig
from gti.core.errors import ConfigError
from gti.train.recommender import ranking_precision

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, smollm2_path):
    """The tiny Llama with init std 0.2: logits far from flat, so bf16 arithmetic moves scores by much more
    than float32 rounding does (with std 0.02 both are a few float32 ulps)."""
    from conftest import _save_tiny

    return _save_tiny(tmp_path_factory.mktemp("sharp-llama"), smollm2_path, tied=True, initializer_range=0.2)


@pytest.fixture(scope="module")
def evaluate(tmp_path_factory, sharp_model_dir):
    """(trainer.precision, eval.precision) -> (predictions.jsonl rows, metrics.json, every beam score) of a
    fine-tuning run with zero training steps on the toy data; each run once per module."""
    from gti.finetune import run

    root = tmp_path_factory.mktemp("eval-precision")
    write_toy_dataset(root / "data")
    cache: dict = {}

    def get(precision: str, eval_precision: str = "fp32"):
        if (precision, eval_precision) in cache:
            return cache[precision, eval_precision]
        scores, search = [], gti.train.recommender.constrained_beam_search

        def spy(*args, **kw):
            beams = search(*args, **kw)
            scores.extend(s for per_prompt in beams for _, s in per_prompt)
            return beams

        out = root / f"ft-{precision}-{eval_precision}"
        cfg = FinetuneConfig(
            model=sharp_model_dir,
            data=DataConfig(name="toy", root=str(root / "data")),
            trainer=TrainerConfig(max_steps=0, accelerator="cpu", precision=precision),
            eval=EvalConfig(num_beams=5, ks=[1, 5], batch_size=4, valid=False, precision=eval_precision),
            output_dir=str(out),
        )
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gti.train.recommender, "constrained_beam_search", spy)
            run(cfg)
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        cache[precision, eval_precision] = preds, json.loads((out / "metrics.json").read_text()), scores, out
        return cache[precision, eval_precision]

    return get


def test_fp32_ranking_ignores_training_precision(evaluate):
    fp32, mixed = evaluate("32-true"), evaluate("bf16-mixed")
    # the same weights rank the same, to the last bit of every beam score (before the fix the bf16-mixed
    # run's test_step ran under bf16 autocast and its scores moved)
    assert mixed[2] == fp32[2] and len(fp32[2]) >= 9
    assert mixed[0] == fp32[0]
    assert fp32[1]["eval_precision"] == mixed[1]["eval_precision"] == "fp32"
    # bf16 ranking is one explicit choice, also independent of the training precision, and it differs
    bf16 = evaluate("32-true", "bf16")
    assert bf16[2] == evaluate("bf16-mixed", "bf16")[2]
    assert bf16[2] != fp32[2] and bf16[1]["eval_precision"] == "bf16"
    # tf32: fp32 arithmetic but for TF32 matmuls where the device has them (none on this CPU: equal to the bit), so
    # far closer to fp32 than bf16 gets, under bf16-mixed training too
    tf32 = evaluate("bf16-mixed", "tf32")
    assert len(tf32[2]) == len(fp32[2]) and tf32[1]["eval_precision"] == "tf32"
    err_tf32, err_bf16 = (max(abs(a - b) for a, b in zip(run[2], fp32[2])) for run in (tf32, bf16))
    assert err_tf32 < err_bf16 / 4, (err_tf32, err_bf16)


def test_bf16_true_ranks_with_upcast_weights(evaluate):
    # bf16-true trains bf16 weights: ranking upcasts them (exact), so it is fp32 arithmetic on the bf16-rounded
    # weights: close to the fp32 run, far closer than bf16 arithmetic gets, and the saved model stays bf16
    fp32, bf16, true = evaluate("32-true")[2], evaluate("32-true", "bf16")[2], evaluate("bf16-true")
    assert true[1]["eval_precision"] == "fp32"
    err_true = max(abs(a - b) for a, b in zip(true[2], fp32))
    err_bf16 = max(abs(a - b) for a, b in zip(bf16, fp32))
    assert err_true < err_bf16 / 4, (err_true, err_bf16)
    assert json.loads((true[3] / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert evaluate("bf16-true", "bf16")[1]["eval_precision"] == "bf16"  # bf16 ranking runs there too


def test_ranking_precision_context(tiny_model):
    x = torch.ones(1, 4, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's bf16-mixed wraps test_step in
        with ranking_precision(tiny_model, "fp32"):
            assert tiny_model(x).logits.dtype == torch.float32
        with ranking_precision(tiny_model, "bf16"):
            assert tiny_model(x).logits.dtype == torch.bfloat16
    tiny_model.to(torch.bfloat16)
    torch.set_default_dtype(torch.bfloat16)  # what Lightning's bf16-true sets around test_step
    try:
        with ranking_precision(tiny_model, "fp32"):
            assert next(tiny_model.parameters()).dtype == torch.float32
            assert torch.zeros(1).dtype == torch.float32  # beam scores are summed in fp32
        assert next(tiny_model.parameters()).dtype == torch.bfloat16
        assert torch.get_default_dtype() == torch.bfloat16
    finally:
        torch.set_default_dtype(torch.float32)


def test_tf32_ranking_is_fp32_with_tf32_matmuls_and_puts_the_setting_back(tiny_model):
    """eval.precision=tf32: fp32 weights and activations, torch's "high" float32 matmul precision (TF32 tensor cores
    on GPUs that have them) inside the ranking only; fp32 ranks at the "highest", whatever the caller had set."""
    x = torch.ones(1, 4, dtype=torch.long)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")  # a caller's own setting
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with ranking_precision(tiny_model, "tf32"):
                assert torch.get_float32_matmul_precision() == "high"
                assert tiny_model(x).logits.dtype == torch.float32
            with ranking_precision(tiny_model, "fp32"):
                assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"
        tiny_model.to(torch.bfloat16)
        with ranking_precision(tiny_model, "tf32"):  # low-precision weights upcast, as for fp32
            assert next(tiny_model.parameters()).dtype == torch.float32
        assert next(tiny_model.parameters()).dtype == torch.bfloat16
    finally:
        torch.set_float32_matmul_precision(before)
        tiny_model.to(torch.float32)


@pytest.mark.parametrize(
    "ev, match",
    [
        (
            EvalConfig(num_beams=10, ks=[1, 5, 20]),
            r"eval.ks: K=20 exceeds eval.num_beams=10.*Recall@20 would be capped",
        ),
        (EvalConfig(precision="fp16"), r"eval.precision='fp16'"),
        (EvalConfig(ranking="greedy"), r"eval.ranking='greedy': choose one of beam, exact"),
        (EvalConfig(exact_check_users=-1), r"eval.exact_check_users=-1"),
    ],
)
def test_bad_eval_config_fails_before_any_compute(tmp_path, ev, match):
    from gti.finetune import run

    # the data folder does not exist: the eval check must fire before anything is loaded
    cfg = FinetuneConfig(data=DataConfig(name="absent", root=str(tmp_path)), eval=ev, output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=match):
        run(cfg)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_exact_ranking_may_cut_beyond_the_beams():
    from gti.core.checks import eval_problems

    assert eval_problems(EvalConfig(num_beams=5, ks=[5, 10], ranking="exact")) == []  # it ranks every item


def test_exact_ranking_and_the_beam_check_in_a_run(tmp_path, sharp_model_dir):
    """eval.ranking=exact ranks as the beam does when the beam covers the catalogue (12 items, 12 beams), and
    eval.exact_check_users records "beam_vs_exact" in metrics.json in the shape the benchmark report reads."""
    from gti.finetune import run

    write_toy_dataset(tmp_path / "data")
    got = {}
    for ranking in ("beam", "exact"):
        out = tmp_path / ranking
        cfg = FinetuneConfig(
            model=sharp_model_dir,
            init="random",  # distinct SID rows: mean init ties every item, and tied items rank in any order
            data=DataConfig(name="toy", root=str(tmp_path / "data")),
            trainer=TrainerConfig(max_steps=0, accelerator="cpu"),
            eval=EvalConfig(num_beams=12, ks=[1, 5, 10], batch_size=4, valid=False, ranking=ranking, exact_check_users=5),
            output_dir=str(out),
        )
        run(cfg)
        preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        got[ranking] = preds, json.loads((out / "metrics.json").read_text())
    (beam, beam_metrics), (exact, exact_metrics) = got["beam"], got["exact"]
    assert [p["items"] for p in exact] == [p["items"] for p in beam] and len(exact) == 9
    assert exact_metrics["test"] == beam_metrics["test"] and exact_metrics["ranking"] == "exact"
    check = beam_metrics["beam_vs_exact"]
    recall, ndcg = check["recall@10"]["beam"], check["ndcg@10"]["beam"]
    assert check == {
        "users": 5, "top10_equal": 1.0, "top10_same_set": 1.0,
        "recall@10": {"beam": recall, "exact": recall}, "ndcg@10": {"beam": ndcg, "exact": ndcg},
    }  # fmt: skip

    # the script re-ranks the finished run and records its figures where the benchmark report reads them
    metrics = tmp_path / "beam" / "metrics.json"
    metrics.write_text(json.dumps({k: v for k, v in beam_metrics.items() if k != "beam_vs_exact"}))
    script = Path(__file__).parent.parent / "scripts" / "beam_vs_exact.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "beam"), "--users", "5", "--beams", "12", "--record"],
                   check=True, capture_output=True)  # fmt: skip
    rec = json.loads(metrics.read_text())["beam_vs_exact"]
    assert rec["users"] == 5 and rec["top10_equal"] == rec["top10_same_set"] == 1.0
    assert rec["recall@10"]["beam"] == rec["recall@10"]["exact"] and rec["ndcg@10"]["beam"] == rec["ndcg@10"]["exact"]

    # and how bf16 / tf32 ranking would change its lists (tf32 emulated: a CPU has none)
    script = Path(__file__).parent.parent / "scripts" / "compare_eval_precision.py"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "beam"), "--users", "5"], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    assert "5 test users, beam 12, top-10; tf32 emulated" in out, out
    assert "bf16 against fp32: top-10 list differs" in out and "tf32 against fp32: top-10 list differs" in out
    assert "equals the lists of fp32 for 100.0%" in out  # the prompts are rebuilt as the run built them


def test_emulated_tf32_keeps_ten_mantissa_bits_rounding_half_to_even():
    import importlib.util

    path = Path(__file__).parent.parent / "scripts" / "compare_eval_precision.py"
    spec = importlib.util.spec_from_file_location("compare_eval_precision", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ulp = 2.0**-10  # TF32's spacing just above 1
    x = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp, -(1 + 3 * ulp / 2), 1 + ulp / 2 + 2**-20, 3.14159265])
    want = [1.0, 1 + 2 * ulp, 1 + ulp, -(1 + 2 * ulp), 1 + ulp, 3.140625]  # ties go to the even neighbour
    assert script.to_tf32(x).tolist() == want
    assert script.to_tf32(x.double()).dtype == torch.float64  # other dtypes pass through
    a, b = torch.randn(64, 96), torch.randn(96, 32)
    with script.EmulatedTf32():
        rounded = a @ b
    torch.testing.assert_close(rounded, script.to_tf32(a) @ script.to_tf32(b), rtol=0, atol=0)
    assert not torch.equal(rounded, a @ b)


def test_beam_check_sees_a_beam_that_misses(tiny_model, tokenizer):
    """With one beam the search keeps one prefix per step; the check must count the users it costs."""
    from gti.rank.trie import SidTrie
    from gti.train.recommender import agreement, beam_vs_exact

    seqs = [[100 + i % 5, 110 + i // 5, 120 + i % 3] for i in range(30)]
    trie = SidTrie(seqs, eos_token_id=tokenizer.eos_token_id)
    tokenizer.padding_side = "left"
    enc = tokenizer(["a b c", "I liked these", "hi there you"], return_tensors="pt", padding=True)
    batch = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "target": torch.tensor([0, 7, 29])}
    wide = beam_vs_exact(tiny_model, tokenizer, trie, [batch], EvalConfig(num_beams=30, ks=[10]))
    assert wide["top10_equal"] == 1.0 and wide["users"] == 3
    narrow = beam_vs_exact(tiny_model, tokenizer, trie, [batch], EvalConfig(num_beams=1, ks=[1]))
    assert narrow["top10_equal"] == 0.0  # one beam returns one SID, exact returns ten
    assert narrow["recall@10"]["exact"] == wide["recall@10"]["exact"]
    # the figures from hand-made lists: target 5 is 2nd in one list, missing from the other
    fig = agreement([[4, 5, 6], [1, 2, 3]], [[4, 5, 6], [2, 1, 3]], [5, 9], k=3)
    assert fig["top3_equal"] == 0.5 and fig["top3_same_set"] == 1.0
    assert fig["recall@3"] == {"beam": 0.5, "exact": 0.5}
    assert fig["ndcg@3"]["beam"] == pytest.approx(0.5 / math.log2(3))


def test_benchmark_and_protocol_reject_ks_above_beams(tmp_path, monkeypatch):
    from gti.experiments.benchmark import BenchmarkConfig
    from gti.experiments.benchmark import run as benchmark
    from gti.experiments.protocol import ProtocolConfig, check, commands

    cfg = BenchmarkConfig(output_dir=str(tmp_path / "b"))
    cfg.finetune.eval = EvalConfig(num_beams=5, ks=[5, 10])
    with pytest.raises(ConfigError, match=r"finetune.eval.ks: K=10 exceeds eval.num_beams=5"):
        benchmark(cfg)
    assert not (tmp_path / "b").exists()
    monkeypatch.chdir(ROOT)  # the protocol's stage config paths are relative to the repo
    p = ProtocolConfig()
    p.finetune.num_beams, p.finetune.ks = 8, [5, 10]
    _, problems = check(p, commands(p))
    assert any("gti.finetune: eval.ks: K=10 exceeds eval.num_beams=8" in x for x in problems)


def test_every_config_ranks_within_its_beams(monkeypatch):
    from gti.core.checks import eval_problems
    from gti.core.config import load_config
    from gti.experiments.benchmark import BenchmarkConfig
    from gti.experiments.protocol import SCHEMAS, ProtocolConfig, commands

    monkeypatch.chdir(ROOT)
    checked = 0
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        name = path.name
        if name.startswith("finetune"):
            evs = [load_config(FinetuneConfig, [str(path)]).eval]
        elif name.startswith("benchmark"):
            evs = [load_config(BenchmarkConfig, [str(path)]).finetune.eval]
        elif name in ("gti-paper.yaml", "lcrec-instruments.yaml", "tiger-beauty.yaml"):  # protocol configs
            steps = commands(load_config(ProtocolConfig, [str(path)]))
            evs = [load_config(SCHEMAS[m], argv).eval for m, argv in steps if m == "gti.finetune"]
        else:
            continue
        for ev in evs:
            assert eval_problems(ev) == [], (name, eval_problems(ev))
            checked += 1
    assert checked >= 6
