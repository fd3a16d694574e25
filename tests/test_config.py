import subprocess
import sys
import time
from pathlib import Path

import pytest

from gti.config import FinetuneConfig, GroundConfig, PrepareConfig, SidsConfig, load_config
from gti.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
SCHEMAS = {"ground": GroundConfig, "finetune": FinetuneConfig, "prepare": PrepareConfig, "sids": SidsConfig}


def schema_for(path: Path):
    for prefix, schema in SCHEMAS.items():
        if path.stem.startswith(prefix):
            return schema
    if path.stem.startswith("benchmark"):
        from gti.benchmark import BenchmarkConfig

        return BenchmarkConfig
    from gti.protocol import ProtocolConfig

    return ProtocolConfig


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_loads(path):
    cfg = load_config(schema_for(path), [str(path)])
    assert cfg is not None


def test_overrides_and_types():
    cfg = load_config(GroundConfig, ["trainer.max_steps=3", "optim.lr=0.01", "ground.templates=[title2sid]", "init_options={k: 4}"])
    assert cfg.trainer.max_steps == 3 and cfg.optim.lr == 0.01
    assert cfg.ground.templates == ["title2sid"] and cfg.init_options == {"k": 4}


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(GroundConfig, ["trainer.max_stepz=3", "optim.lr=abc", "seed=1.5", "data.nam=x"])
    msg = str(e.value)
    assert "trainer.max_stepz" in msg and "did you mean 'trainer.max_steps'" in msg
    assert "optim.lr" in msg and "'seed'" in msg and "data.nam" in msg


def test_yaml_unknown_key_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError, match=r"trainer.max_stepz.*bad.yaml"):
        load_config(GroundConfig, [str(p)])


def test_missing_required_value():
    from dataclasses import dataclass

    from omegaconf import MISSING

    @dataclass
    class Needs:
        path: str = MISSING

    with pytest.raises(ConfigError, match="missing required value 'path'"):
        load_config(Needs, [])


def test_cli_wrong_key_fails_fast():
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "gti.ground", "trainer.max_stepz=3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "trainer.max_stepz" in r.stderr and "Traceback" not in r.stderr
    assert time.time() - t < 5  # config is checked before torch/lightning are even imported
