"""The real pipeline on a small slice: SmolLM2-135M from the package, MovieLens-100K from the wheel."""

import json

import pytest
import torch

from gti.core.config import DataConfig, EvalConfig, FinetuneConfig, GroundConfig, OptimConfig, TrainerConfig

pytestmark = pytest.mark.slow


def test_default_model_generates_english(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_real_ground_then_finetune_on_a_slice(tmp_path):
    from gti.finetune import run as finetune
    from gti.ground import run as ground

    data = DataConfig(name="ml-100k", root=str(tmp_path / "data"), max_users=20)
    g = ground(GroundConfig(data=data, max_length=48, optim=OptimConfig(batch_size=4),
                            trainer=TrainerConfig(max_steps=2, accelerator="cpu"), output_dir=str(tmp_path / "g")))  # fmt: skip
    meta = json.loads((g / "gti.json").read_text())
    assert meta["base_model"] == "smollm2-135m" and meta["new_tokens"]["count"] > 90
    assert meta["diagnostics"]["init"]["mean_cosine"] == pytest.approx(1.0, abs=1e-4)  # mean init: one point
    assert meta["diagnostics"]["final"]["mean_cosine"] < 1.0
    ft = finetune(FinetuneConfig(init_from=str(g), data=DataConfig(max_history=3, max_users=20), optim=OptimConfig(batch_size=2),
                                 trainer=TrainerConfig(max_steps=2, accelerator="cpu"), max_length=96,
                                 eval=EvalConfig(num_beams=5, ks=[1, 5], batch_size=4, max_users=4), output_dir=str(tmp_path / "f")))  # fmt: skip
    m = json.loads((ft / "metrics.json").read_text())
    assert m["test"]["count"] == 4 and all(torch.isfinite(torch.tensor(v)) for v in m["test"].values())
