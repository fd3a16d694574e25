"""Run folders: built under `<out>.partial/`, renamed when complete, described by `gti.json`."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gti.core.config import to_yaml
from gti.core.errors import ConfigError
from gti.core.io import atomic_write_text, replace_dir, write_json
from gti.core.log import global_rank

SCHEMA_VERSION = 1


def versions(packages: tuple[str, ...] = ("torch", "transformers", "lightning")) -> dict:
    """gti, python, the installed versions of `packages` (read from their metadata, nothing imported) and the platform."""
    from importlib import metadata

    return {
        "gti": __import__("gti").__version__,
        "python": sys.version.split()[0],
        **{name: metadata.version(name) for name in packages},
        "platform": platform.platform(),
    }


def peak_memory_mb() -> dict:
    """The process's peak resident memory (since reset_peak_memory, where Linux allows it) and peak CUDA memory."""
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:  # Linux: the high-water mark that reset_peak_memory can lower; getrusage's never goes down
        status = Path("/proc/self/status").read_text()
        out["peak_rss_mb"] = round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)
    except (OSError, IndexError, ValueError):
        pass
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def reset_peak_memory() -> None:
    """Peaks measured from now: before a stage that runs inside a process that ran others (gti.experiments.runner).
    The resident peak restarts at what the process holds now, memory kept from earlier stages included."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: "5" resets VmHWM to the current RSS
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


@dataclass
class RunDir:
    """A run is built in `<out>.partial/` and renamed to `<out>/` once complete.

    A killed run therefore never leaves a folder that looks finished, and `resume=auto` finds its
    checkpoints in the `.partial` folder.
    """

    final: Path

    @property
    def work(self) -> Path:
        return self.final.with_name(self.final.name + ".partial")

    def start(self, resume: str, cfg) -> Path:
        if resume not in ("never", "auto"):
            raise ConfigError(f"resume must be 'never' or 'auto', got {resume!r}")
        if global_rank() != 0:  # rank 0 owns the folder; other DDP ranks only read it
            return self.work
        if resume == "never" and self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.work / "config.yaml", to_yaml(cfg))
        return self.work

    def last_checkpoint(self, resume: str) -> str | None:
        last = self.work / "checkpoints" / "last.ckpt"
        return str(last) if resume == "auto" and last.is_file() else None

    def finish(self) -> Path:
        shutil.rmtree(self.work / "checkpoints", ignore_errors=True)  # big; the model/ folder is the result
        replace_dir(self.work, self.final)
        return self.final


def save_hf(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_metadata(folder: Path, meta: dict) -> None:
    write_json(folder / "gti.json", meta)


@dataclass(frozen=True)
class Run:
    """A finished run folder as its `gti.json` describes it (gti.train.stage.run_metadata says what is written)."""

    folder: Path
    meta: dict

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "")

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    @property
    def dataset(self) -> tuple[str, str]:
        """(root, name) of the dataset the run used."""
        return self.meta["dataset"]["root"], self.meta["dataset"]["name"]

    @property
    def new_tokens(self) -> tuple[int, list[str]]:
        """(first new token id, the new tokens in id order)."""
        return self.meta["new_tokens"]["start"], list(self.meta["new_tokens"]["tokens"])


def read_run(folder: str | Path, stage: str | None = None, what: str = "run folder") -> Run:
    """`folder`'s gti.json, checked: present, readable, of `stage` when one is asked for, with a model/ folder.
    `what` names the folder in errors the way the user gave it: "init_from=" reads "init_from=runs/ground: ..."."""
    folder = Path(folder)
    named = f"{what}{folder}" if what.endswith("=") else f"{what} {folder}"
    meta_path = folder / "gti.json"
    if not meta_path.is_file():
        raise ConfigError(f"{named}: not a gti run folder (no gti.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{meta_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if stage is not None and meta.get("stage") != stage:
        raise ConfigError(f"{named}: gti.json says stage={meta.get('stage')!r}, expected {stage!r}")
    if not (folder / "model" / "config.json").is_file():
        raise ConfigError(f"{named}: no model/ folder with config.json")
    return Run(folder, meta)
