"""An SID index on disk is never replaced silently (docs/traps.md), and configs meant to be compared
build the same SIDs (ground-full.yaml once built 3 x 64 and finetune-full.yaml 3 x 32, so each run
overwrote data/ml-1m/ml-1m.index.json for the other)."""

from __future__ import annotations

import glob
import json

import pytest
from test_sids import clustered, make_dataset

from gti.core.config import DataConfig, FinetuneConfig, GroundConfig, SidsConfig, load_config
from gti.core.errors import ConfigError
from gti.data.dataset import dataset_file
from gti.experiments.benchmark import BenchmarkConfig, check_same_sids
from gti.experiments.protocol import ProtocolConfig, commands, sid_problems
from gti.indexing.build import codevecs_path, quantizer_settings, run
from gti.indexing.ensure import ensure_dataset


def sids(**kw) -> SidsConfig:
    return SidsConfig(**{"levels": 2, "codes": 4, "kmeans_iters": 5, **kw})


def snapshot(root, name: str) -> dict[str, bytes]:
    return {kind: dataset_file(root, name, kind).read_bytes() for kind in ("index", "sids_report")}


# ----------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize("name", ["ml-1m", "toy"])  # packaged (always went through the builder) and not
def test_stage_with_other_settings_stops_and_leaves_the_index(tmp_path, name):
    make_dataset(tmp_path, name=name, emb=clustered(60))
    data = DataConfig(name=name, root=str(tmp_path))
    ensure_dataset(data, sids())
    before = snapshot(tmp_path, name)
    with pytest.raises(ConfigError) as e:
        ensure_dataset(data, sids(codes=5))
    msg = str(e.value)
    report = dataset_file(tmp_path, name, "sids_report")
    assert f"codes: 4 on disk ({report}) vs 5 requested (sids.codes)" in msg  # both settings, both places
    assert "sids.codes=4" in msg  # way out 1: use the index on disk
    assert f"python -m gti.sids data.name={name} data.root={tmp_path} levels=2 codes=5 kmeans_iters=5 force=true" in msg
    assert "data.root" in msg.split("force=true")[1]  # way out 3: another data.root
    assert snapshot(tmp_path, name) == before  # byte-identical: nothing was rebuilt


def test_stage_uses_a_matching_imported_or_unreported_index_as_is(tmp_path, capsys):
    make_dataset(tmp_path, name="ml-1m", emb=clustered(60))
    data = DataConfig(name="ml-1m", root=str(tmp_path))
    ensure_dataset(data, sids())
    index = dataset_file(tmp_path, "ml-1m", "index")
    mtime = index.stat().st_mtime_ns
    ds = ensure_dataset(data, sids())
    assert "up to date" in capsys.readouterr().out and index.stat().st_mtime_ns == mtime and len(ds.index) == 60
    codevecs_path(tmp_path, "ml-1m").unlink()  # a diagnostics output gone: the index still serves
    ensure_dataset(data, sids())
    assert "used as is" in capsys.readouterr().out and index.stat().st_mtime_ns == mtime
    dataset_file(tmp_path, "ml-1m", "sids_report").unlink()  # a hand-placed index: no report to check against
    ensure_dataset(data, sids(codes=7))
    assert "no build report" in capsys.readouterr().out and index.stat().st_mtime_ns == mtime
    run(sids(data=data, import_index=str(index)))  # imported: a stage never rebuilds it, whatever its settings
    mtime = index.stat().st_mtime_ns
    ensure_dataset(data, sids(codes=7))
    assert "imported" in capsys.readouterr().out and index.stat().st_mtime_ns == mtime


def test_stage_stops_when_item_texts_changed(tmp_path):
    make_dataset(tmp_path, name="ml-1m", emb=clustered(60))
    data = DataConfig(name="ml-1m", root=str(tmp_path))
    ensure_dataset(data, sids())
    before = snapshot(tmp_path, "ml-1m")
    item = dataset_file(tmp_path, "ml-1m", "item")
    items = json.loads(item.read_text())
    items["0"]["title"] = "Another title"
    item.write_text(json.dumps(items))
    with pytest.raises(ConfigError, match=r"(?s)item texts changed.*never replaces.*python -m gti.sids data.name=ml-1m"):
        ensure_dataset(data, sids())
    assert snapshot(tmp_path, "ml-1m") == before


# ----------------------------------------------------------------------------------------- gti.sids
def test_explicit_build_with_other_settings_needs_force(tmp_path):
    make_dataset(tmp_path, emb=clustered(60))
    data = DataConfig(name="toy", root=str(tmp_path))
    run(sids(data=data))
    before = snapshot(tmp_path, "toy")
    with pytest.raises(ConfigError) as e:
        run(sids(data=data, codes=5, kmeans_balanced=False))
    report = dataset_file(tmp_path, "toy", "sids_report")
    assert f"codes: 4 on disk ({report}) vs 5 requested (codes)" in str(e.value)
    assert "kmeans_balanced: true on disk" in str(e.value) and "vs false requested (kmeans_balanced)" in str(e.value)
    assert snapshot(tmp_path, "toy") == before
    rebuilt = run(sids(data=data, codes=5, kmeans_balanced=False, force=True))
    assert not rebuilt["skipped"] and rebuilt["codes"] == 5 and snapshot(tmp_path, "toy") != before
    assert run(sids(data=data, codes=5, kmeans_balanced=False))["skipped"]  # and now it matches


# ----------------------------------------------------------------------------------------- shipped configs
def sid_inputs(cfg) -> tuple:
    """What decides the index a config's stage reads: dataset folder + quantiser settings."""
    sids_cfg = cfg if isinstance(cfg, SidsConfig) else cfg.sids
    return cfg.data.name, cfg.data.root, quantizer_settings(sids_cfg)


@pytest.mark.parametrize(
    "first, second",
    [
        ((SidsConfig, "configs/sids.yaml"), (GroundConfig, "configs/ground.yaml")),
        ((GroundConfig, "configs/ground.yaml"), (FinetuneConfig, "configs/finetune.yaml")),
        ((GroundConfig, "configs/ground-full.yaml"), (FinetuneConfig, "configs/finetune-full.yaml")),
    ],
)
def test_stage_config_pairs_build_the_same_sids(first, second):
    assert sid_inputs(load_config(first[0], [first[1]])) == sid_inputs(load_config(second[0], [second[1]]))


@pytest.mark.parametrize("path", sorted(glob.glob("configs/benchmark-*.yaml")))
def test_benchmark_configs_ground_and_finetune_build_the_same_sids(path):
    cfg = load_config(BenchmarkConfig, [path])
    assert sid_inputs(cfg.ground) == sid_inputs(cfg.finetune)
    check_same_sids(cfg)


@pytest.mark.parametrize("path", ["configs/gti-paper.yaml", "configs/lcrec-instruments.yaml", "configs/tiger-beauty.yaml"])
def test_protocol_stages_build_the_sids_of_the_sids_step(path):
    from gti.experiments.protocol import SCHEMAS

    steps = commands(load_config(ProtocolConfig, [path]))
    built = quantizer_settings(load_config(SidsConfig, dict(steps)["gti.sids"]))
    for module, argv in steps:
        if module in ("gti.ground", "gti.finetune"):
            assert quantizer_settings(load_config(SCHEMAS[module], argv).sids) == built, (module, argv)
    assert sid_problems(steps) == []


def test_benchmark_and_protocol_name_disagreeing_sid_settings(tmp_path, monkeypatch):
    import gti.experiments.benchmark

    monkeypatch.setattr(gti.experiments.benchmark, "run_cell", lambda *a: pytest.fail("a cell ran despite the mismatch"))
    cfg = load_config(BenchmarkConfig, ["configs/benchmark-cpu.yaml", "finetune.sids.codes=64", "ground.data.root=elsewhere",
                                        f"output_dir={tmp_path}", "methods=[mean,gti-mean]"])  # fmt: skip
    with pytest.raises(ConfigError) as e:
        gti.experiments.benchmark.run(cfg)
    assert "ground.sids.codes=32 vs finetune.sids.codes=64" in str(e.value)
    assert "ground.data.root=elsewhere vs finetune.data.root=data" in str(e.value)
    check_same_sids(load_config(BenchmarkConfig, ["configs/benchmark-cpu.yaml", "finetune.sids.codes=64", "methods=[mean]"]))

    other = tmp_path / "finetune-seed1.yaml"
    other.write_text("sids:\n  seed: 1\n")
    cfg = load_config(ProtocolConfig, ["configs/tiger-beauty.yaml", f"finetune_config={other}"])
    problems = sid_problems(commands(cfg))
    assert len(problems) == len(cfg.arms) and all("sids.seed=1, but the gti.sids step builds seed=0" in p for p in problems)
