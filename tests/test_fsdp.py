"""Grounding under FSDP on 2 CPU processes: the overlay table trains while sharded and merges back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# Lightning 2.6 runs FSDP on GPUs only. On CPU it (1) refuses strategy="fsdp" with accelerator="cpu", (2) hands
# FSDP device_id=None, which torch 2.13 rejects ("FSDP needs a non-CPU accelerator device"), and (3) gathers full
# state dicts with offload_to_cpu=True, which segfaults when the weights already live on the CPU. torch's FSDP1
# itself shards, trains and gathers on CPU with gloo, so this driver lifts those three and runs the real stage.
# Lightning's launcher re-runs this file (same argv) for rank 1. argv[1]: where rank 0 saves the trained table.
DRIVER = """
import sys

import torch
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.strategies import fsdp as lightning_fsdp
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

import gti.tokens.overlay
from gti.ground import main


class CPUFSDPStrategy(FSDPStrategy):  # a name other than "fsdp" passes Lightning's GPU-only check
    def _setup_model(self, model):
        return FSDP(model, device_id=torch.device("cpu"), sharding_strategy=self.sharding_strategy, **self.kwargs)


def full_state_dict(module, world_size, rank0_only=True):
    no_offload = dict(offload_to_cpu=False, rank0_only=rank0_only)
    return FSDP.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(**no_offload), FullOptimStateDictConfig(**no_offload)
    )


read_rows = gti.tokens.overlay.overlay_rows


def keep_table(model):  # the table gti.ground reads just before merge_overlay
    rows = read_rows(model)
    if torch.distributed.get_rank() == 0:
        torch.save(rows[0], sys.argv[1])
    return rows


StrategyRegistry.register("fsdp_cpu", CPUFSDPStrategy)
lightning_fsdp._get_full_state_dict_context = full_state_dict
gti.tokens.overlay.overlay_rows = keep_table
main(sys.argv[2:])
"""


def ground_args(tmp_path: Path, model_dir: str, out: Path, strategy: str) -> list[str]:
    return [
        f"model={model_dir}", "data.name=toy", f"data.root={tmp_path / 'data'}", f"output_dir={out}",
        "optim.batch_size=8", "optim.lr=0.01", "trainer.max_steps=4", "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1", "trainer.devices=2", f"trainer.strategy={strategy}", "diagnostics=false",
    ]  # fmt: skip


def new_rows(run: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    meta = json.loads((run / "gti.json").read_text())
    s, n = meta["new_tokens"]["start"], meta["new_tokens"]["count"]
    return AutoModelForCausalLM.from_pretrained(run / "model").get_input_embeddings().weight[s : s + n].detach()


@pytest.mark.ddp
def test_fsdp_grounding_trains_and_merges_the_overlay(tmp_path, tiny_model_dir):
    write_toy_dataset(tmp_path / "data")
    driver, table = tmp_path / "fsdp_ground.py", tmp_path / "table.pt"
    driver.write_text(DRIVER)
    run = [sys.executable, str(driver), str(table), *ground_args(tmp_path, tiny_model_dir, tmp_path / "fsdp", "fsdp_cpu")]
    r = subprocess.run(run, env=ENV, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "fsdp" / "gti.json").read_text())["steps"] == 4

    from transformers import AutoModelForCausalLM

    from gti.data.dataset import load_dataset
    from gti.tokens.extend import extend_model

    # merge_overlay gave a plain HF model holding exactly the trained (n, d) table, not a shard of it
    trained, rows = torch.load(table), new_rows(tmp_path / "fsdp")
    assert trained.shape == rows.shape and torch.equal(rows, trained)
    # the table trained while sharded: every new row moved from its starting point (tied head: all get a gradient)
    init_model, _, new = extend_model(tiny_model_dir, load_dataset(tmp_path / "data", "toy", need_index=True), "mean", {}, None, 0)
    assert torch.isfinite(rows).all() and (rows != init_model.get_input_embeddings().weight[new.start :]).any(dim=1).all()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model").get_input_embeddings().weight
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    assert torch.equal(saved[: new.start], base)  # old rows bit-identical

    # sharding is invisible to the maths: the same run under DDP ends with the same table
    ddp = subprocess.run([sys.executable, "-m", "gti.ground", *ground_args(tmp_path, tiny_model_dir, tmp_path / "ddp", "ddp")],
                         env=ENV, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    torch.testing.assert_close(rows, new_rows(tmp_path / "ddp"), rtol=0, atol=1e-6)
