"""Every protocol config under configs/ loads and dry-runs on a fixture in its data format."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_importers import write_amazon2014, write_amazon2018, write_lcrec

from gti.core.config import load_config
from gti.core.errors import ConfigError, GtiError
from gti.experiments.protocol import ProtocolConfig, run

ROOT = Path(__file__).parent.parent
FIXTURES = {  # config -> writer of a source folder in its format
    "tiger-beauty.yaml": lambda d: write_amazon2014(d, "Beauty"),
    "lcrec-instruments.yaml": lambda d: write_amazon2018(d, "Musical_Instruments"),
    "gti-paper.yaml": lambda d: write_lcrec(d, "vibrent"),
}


def protocol(name, *overrides):
    return load_config(ProtocolConfig, [str(ROOT / "configs" / name), *overrides])


def test_every_protocol_config_is_covered():
    names = {p.name for p in (ROOT / "configs").glob("*.yaml") if "arms" in OmegaConf.load(p)}  # protocol configs
    assert names == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_dry_run(tmp_path, name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the stage config paths in the YAMLs are relative to the repo
    src = FIXTURES[name](tmp_path / "raw")
    cfg = protocol(name, f"source={src}", f"prepare.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}")
    assert cfg.dry_run and cfg.sids.levels in (3, 4) and cfg.ground.lr == 1e-3 and cfg.ground.epochs == 10
    printed = run(cfg)
    out = capsys.readouterr().out
    assert "records parse" in out and "nothing was trained" in out
    modules = [shlex.split(c)[2] for c in printed]
    assert modules[:2] == ["gti.prepare", "gti.sids"] and modules.count("gti.finetune") == len(cfg.arms)
    assert ("gti.ground" in modules) == ("gti" in cfg.arms)
    assert f"source={src}" in printed[0] and f"levels={cfg.sids.levels}" in printed[1]
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()  # nothing ran


def test_dry_run_reports_every_problem(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    src = write_amazon2014(tmp_path / "raw", "Beauty")
    (src / "meta_Beauty.json.gz").unlink()
    cfg = protocol("tiger-beauty.yaml", f"source={src}", "arms=[gti,best]", "finetune_config=configs/nope.yaml")
    with pytest.raises(ConfigError) as e:
        run(cfg)
    msg = str(e.value)
    assert "meta_Beauty.json.gz: file not found" in msg and "best" in msg and "configs/nope.yaml" in msg
    with pytest.raises(ConfigError, match="needs source="):
        run(protocol("tiger-beauty.yaml"))


def test_run_executes_stages_in_order_and_stops_at_a_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    src = write_amazon2014(tmp_path / "raw", "Beauty")
    calls = []

    def fake(argv, **kw):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1 if argv[2] == "gti.ground" else 0)

    monkeypatch.setattr(subprocess, "run", fake)
    with pytest.raises(GtiError, match=r"step 3 \(gti.ground\) failed"):
        run(protocol("tiger-beauty.yaml", f"source={src}", "dry_run=false"))
    assert [c[:3] for c in calls] == [[sys.executable, "-m", m] for m in ("gti.prepare", "gti.sids", "gti.ground")]


def finished_run(folder: Path, stage: str) -> None:
    """What a stage leaves once it completes: gti.json and model/config.json in the final (not .partial) folder."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "gti.json").write_text(json.dumps({"stage": stage}))


def test_rerun_skips_stages_whose_run_folder_is_finished(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    src, runs = write_amazon2014(tmp_path / "raw", "Beauty"), tmp_path / "runs"
    calls = []

    def fake(argv, **kw):
        calls.append(argv[2])
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", fake)
    finished_run(runs / "ground", "ground")  # an earlier run got past grounding
    (runs / "finetune-gti.partial").mkdir()  # and was killed while fine-tuning: not finished, runs again
    cfg = protocol("tiger-beauty.yaml", f"source={src}", f"output_dir={runs}", "dry_run=false")
    printed = run(cfg)
    assert calls == ["gti.prepare", "gti.sids", "gti.finetune", "gti.finetune"]
    assert f"[gti.protocol] step 3/5: {runs / 'ground'} is finished, skipped" in capsys.readouterr().out
    assert len(printed) == 5  # the skipped step is still one of the commands

    finished_run(runs / "finetune-gti", "finetune")
    finished_run(runs / "finetune-mean", "ground")  # another stage's folder at that path: an error, not a skip
    calls.clear()
    with pytest.raises(ConfigError, match=r"finetune output_dir .*finetune-mean: gti.json says stage='ground'"):
        run(protocol("tiger-beauty.yaml", f"source={src}", f"output_dir={runs}", "dry_run=false"))
    assert calls == ["gti.prepare", "gti.sids"]


def test_lcrec_folder_keeps_its_own_sids(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    src = write_lcrec(tmp_path / "Instruments")
    printed = run(
        protocol(
            "lcrec-instruments.yaml",
            f"source={src}",
            "prepare.dataset=lcrec",
            "prepare.category=null",
            "sids.imported=true",
        )
    )
    assert (
        printed[1]
        == "python -m gti.sids data.name=Instruments data.root=data import_index=data/Instruments/Instruments.index.json"
    )
    with pytest.raises(ConfigError, match="sids.imported=true needs prepare.dataset=lcrec"):
        run(protocol("tiger-beauty.yaml", f"source={write_amazon2014(tmp_path / 'raw')}", "sids.imported=true"))
