"""Bad input gets one clear error naming the file / key / step, and leaves no finished-looking output."""

import json
import shutil

import pytest
from fixtures import write_toy_dataset

from gti.core.config import DataConfig, FinetuneConfig, GroundConfig, OptimConfig, TrainerConfig
from gti.core.errors import ConfigError, DataError, TrainingError


def ground_cfg(tmp_path, model_dir, **kw):
    base = dict(
        model=model_dir, data=DataConfig(name="toy", root=str(tmp_path / "data")), optim=OptimConfig(batch_size=8),
        trainer=TrainerConfig(max_steps=3, accelerator="cpu", log_every_n_steps=1), output_dir=str(tmp_path / "g"),
    )  # fmt: skip
    base.update(kw)
    return GroundConfig(**base)


def test_nan_loss_stops_with_the_step_and_keeps_no_final_folder(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import LlamaModel

    from gti.ground import run

    forward, calls = LlamaModel.forward, []

    def diverging(self, *args, **kwargs):  # the decoder's output (so the loss) turns NaN on the third training step
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 3:
            out.last_hidden_state = out.last_hidden_state * float("nan")
        return out

    monkeypatch.setattr(LlamaModel, "forward", diverging)
    write_toy_dataset(tmp_path / "data")
    cfg = ground_cfg(tmp_path, tiny_model_dir, trainer=TrainerConfig(max_steps=20, accelerator="cpu", checkpoint_every=1))
    with pytest.raises(TrainingError, match=r"loss is nan at step 2; stopped.*checkpoints"):
        run(cfg)
    assert not (tmp_path / "g").exists() and (tmp_path / "g.partial" / "checkpoints" / "last.ckpt").is_file()


def test_history_longer_than_the_context(tmp_path, tiny_model_dir):
    from gti.finetune import run

    write_toy_dataset(tmp_path / "data")
    cfg = FinetuneConfig(model=tiny_model_dir, data=DataConfig(name="toy", root=str(tmp_path / "data")), max_length=24,
                         trainer=TrainerConfig(max_steps=1, accelerator="cpu"), output_dir=str(tmp_path / "f"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"max_length=24 is too short.*data.max_history"):
        run(cfg)


def test_stage1_folder_whose_tokenizer_does_not_match(tmp_path, tiny_model_dir):
    from gti.finetune import run
    from gti.ground import run as ground

    write_toy_dataset(tmp_path / "data")
    out = ground(ground_cfg(tmp_path, tiny_model_dir))
    meta = json.loads((out / "gti.json").read_text())
    meta["new_tokens"]["count"] += 5  # metadata no longer matches the saved tokenizer
    (out / "gti.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="tokenizer size"):
        run(FinetuneConfig(init_from=str(out), output_dir=str(tmp_path / "f")))
    meta["stage"] = "finetune"
    (out / "gti.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="expected 'ground'"):
        run(FinetuneConfig(init_from=str(out), output_dir=str(tmp_path / "f")))


def test_changed_sid_index_is_detected(tmp_path, tiny_model_dir):
    from gti.finetune import run
    from gti.ground import run as ground

    write_toy_dataset(tmp_path / "data")
    out = ground(ground_cfg(tmp_path, tiny_model_dir))
    index = tmp_path / "data" / "toy" / "toy.index.json"
    index.write_text(index.read_text().replace("<c_0>", "<c_9>"))
    with pytest.raises(ConfigError, match="changed since"):
        run(FinetuneConfig(init_from=str(out), output_dir=str(tmp_path / "f")))


@pytest.mark.parametrize(
    "line,match",
    [
        ('{"token": "<x>", "description": "a"}\n{"token": "<y>"', r"tokens.jsonl: line 2: malformed JSON"),
        ('{"token": "<x>", "description": ""}', r"line 1: token '<x>' has an empty description"),
        ('{"token": "<x>", "description": "a"}\n{"token": "<x>", "description": "b"}', r"'<x>' appears twice"),
        ('{"description": "a"}', r"line 1: expected"),
    ],
)
def test_tokens_file_errors(tmp_path, line, match):
    from gti.tokens.vocab import read_tokens_file

    p = tmp_path / "tokens.jsonl"
    p.write_text(line)
    with pytest.raises(DataError, match=match):
        read_tokens_file(p)


def test_missing_dataset_names_the_command(tmp_path, tiny_model_dir):
    from gti.ground import run

    with pytest.raises(ConfigError, match=r"toy.inter.json not found; run `python -m gti.prepare`"):
        run(ground_cfg(tmp_path, tiny_model_dir))
    shutil.rmtree(tmp_path / "g.partial", ignore_errors=True)


def test_unknown_template_and_strategy_listed_together(tmp_path, tiny_model_dir):
    from gti.core.config import GroundStageConfig
    from gti.ground import run

    with pytest.raises(ConfigError) as e:
        run(ground_cfg(tmp_path, tiny_model_dir, init="nope", ground=GroundStageConfig(templates=["title2sid", "bad"])))
    assert "unknown template 'bad'" in str(e.value) and "unknown strategy 'nope'" in str(e.value)


def test_misspelt_init_option_is_named_before_any_compute(tmp_path, tiny_model_dir):
    from gti.finetune import run as finetune
    from gti.ground import run

    with pytest.raises(ConfigError, match=r"init_options.temprature: unknown option; did you mean 'temperature'\?"):
        run(ground_cfg(tmp_path, tiny_model_dir, init="topk", init_options={"temprature": 0.1}))
    cfg = FinetuneConfig(model=tiny_model_dir, output_dir=str(tmp_path / "f"), init="topk", init_options={"kk": 4}, templates=[0, 5])
    with pytest.raises(ConfigError, match=r"init_options.kk: unknown option; did you mean 'k'\?") as e:
        finetune(cfg)
    assert "templates=[0, 5]: one or more indices of the 3 rec templates (0..2)" in str(e.value)
    assert not (tmp_path / "f.partial").exists() and not (tmp_path / "g.partial").exists()
