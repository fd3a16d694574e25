"""Options that used to be read nowhere or to do something other than their comment says."""

import json

import pytest
from fixtures import write_toy_dataset

from gti.core.config import DataConfig, GroundConfig, OptimConfig, TrainerConfig
from gti.core.errors import ConfigError
from gti.data.dataset import Dataset
from gti.data.slices import subset
from gti.train.trainer import make_trainer


def _ds(inter):
    items = {i: {"title": f"t{i}"} for i in range(10)}
    return Dataset("toy", ".", inter, items, {i: [f"<a_{i}>"] for i in items})


def test_max_items_keeps_whole_users_only():
    ds = _ds({0: [0, 1, 2, 3], 1: [0, 7, 1, 2], 2: [2, 3, 4], 3: [1, 2]})
    out = subset(ds, max_users=0, max_items=5)
    # user 1 has item 7: dropping it would invent the transition 0 -> 1; user 3 is too short for leave-one-out
    assert out.inter == {0: [0, 1, 2, 3], 2: [2, 3, 4]}
    assert out.items is ds.items and out.index is ds.index  # the catalogue and trie stay whole


def test_max_items_below_every_user_is_an_error():
    with pytest.raises(ConfigError, match="data.max_items=1"):
        subset(_ds({0: [0, 1, 2]}), max_users=0, max_items=1)


@pytest.mark.parametrize(("value", "interval", "every_epoch"), [(1.0, 1.0, 1), (0.25, 0.25, 1), (50.0, 50, None)])
def test_val_check_interval_reaches_the_trainer(tmp_path, value, interval, every_epoch):
    trainer = make_trainer(TrainerConfig(accelerator="cpu", val_check_interval=value), tmp_path, max_steps=10)
    assert trainer.val_check_interval == interval and type(trainer.val_check_interval) is type(interval)
    assert trainer.check_val_every_n_epoch == every_epoch  # None: every N batches counted across epochs


def test_grounding_without_diagnostics(tmp_path, tiny_model_dir):
    from gti.ground import run

    write_toy_dataset(tmp_path / "data")
    cfg = GroundConfig(
        model=tiny_model_dir, data=DataConfig(name="toy", root=str(tmp_path / "data")), diagnostics=False,
        optim=OptimConfig(batch_size=8), trainer=TrainerConfig(max_steps=1, accelerator="cpu"), output_dir=str(tmp_path / "g"),
    )  # fmt: skip
    out = run(cfg)
    assert json.loads((out / "gti.json").read_text())["diagnostics"] == {}
    assert not list(out.glob("diagnostics_*.json")) and not list(out.glob("*.png"))
