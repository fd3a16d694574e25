import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gti.core.config import (
    DataConfig,
    FinetuneConfig,
    GroundConfig,
    PrepareConfig,
    SasrecConfig,
    SidsConfig,
    flatten,
    load_config,
)
from gti.core.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
SCHEMAS = {"ground": GroundConfig, "finetune": FinetuneConfig, "prepare": PrepareConfig, "sids": SidsConfig, "sasrec": SasrecConfig}


def schema_for(path: Path):
    for prefix, schema in SCHEMAS.items():
        if path.stem.startswith(prefix):
            return schema
    if path.stem.startswith("benchmark"):
        from gti.experiments.benchmark import BenchmarkConfig

        return BenchmarkConfig
    from gti.experiments.protocol import ProtocolConfig

    return ProtocolConfig


def value_at(cfg, key: str):
    """The loaded config's value at a dotted YAML key (dataclass attributes, then dict entries)."""
    for part in key.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_loads(path):
    schema = schema_for(path)
    cfg = load_config(schema, [str(path)])
    assert isinstance(cfg, schema)
    leaves = flatten(OmegaConf.to_container(OmegaConf.load(path)))
    assert len(leaves) >= 3, f"{path.name}: suspiciously few keys"
    for key, value in leaves:  # every key of the YAML lands in the typed config with the YAML's value
        got = value_at(cfg, key)
        assert got == value and (isinstance(got, float) or type(got) is type(value) or value is None), (
            f"{path.name}: {key} = {got!r}, the YAML says {value!r}"
        )


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


WRONG_KEY = """
import json, sys
from gti.{stage} import main
try:
    main(["trainer.max_stepz=3"])
    code = None
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in ("torch", "lightning", "transformers") if m in sys.modules)}}))
"""


@pytest.mark.parametrize("stage", ["ground", "finetune"])
def test_cli_wrong_key_fails_before_heavy_imports(stage):
    r = subprocess.run([sys.executable, "-c", WRONG_KEY.format(stage=stage)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"code": 2, "heavy": []}  # config is checked before torch / lightning / transformers load
    assert "unknown key 'trainer.max_stepz'" in r.stderr and "did you mean 'trainer.max_steps'" in r.stderr
    assert "Traceback" not in r.stderr
    cli = subprocess.run([sys.executable, "-m", f"gti.{stage}", "trainer.max_stepz=3"], capture_output=True, text=True)
    assert cli.returncode == 2 and "trainer.max_stepz" in cli.stderr and "Traceback" not in cli.stderr


def test_the_nested_sids_data_section_is_not_read_so_it_cannot_be_set():
    """ground and finetune build SIDs for their own data.*: a different sids.data.* would be ignored silently."""
    with pytest.raises(ConfigError, match=r"'sids.data.name' \(command line\) is not read.*set 'data.name'"):
        load_config(GroundConfig, ["sids.data.name=ml-1m"])
    assert load_config(FinetuneConfig, ["data.name=ml-1m", "sids.data.name=ml-1m"]).data.name == "ml-1m"  # agrees
    # unset, it shows the data the stage uses (a printed or saved config.yaml), at any depth
    assert load_config(GroundConfig, ["data.name=ml-1m", "data.max_users=7"]).sids.data == DataConfig(name="ml-1m", max_users=7)
    from gti.experiments.benchmark import BenchmarkConfig

    with pytest.raises(ConfigError, match=r"set 'finetune.data.max_users'"):
        load_config(BenchmarkConfig, ["finetune.sids.data.max_users=5"])
    assert load_config(BenchmarkConfig, ["configs/benchmark-gpu-quick.yaml"]).finetune.sids.data.name == "ml-1m"
    ground_help = subprocess.run([sys.executable, "-m", "gti.ground", "--help"], capture_output=True, text=True).stdout
    assert "sids.levels" in ground_help and "sids.data" not in ground_help
