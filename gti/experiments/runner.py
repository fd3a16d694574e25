"""One stage as a user would type it (`python -m gti.<stage> ...`), skipped when its run folder is already finished:
an interrupted benchmark or protocol resumes by running the same command again. The stage runs in a fresh Python
process, or inside this one (`run_here`: the same main(argv), without the seconds each new process spends importing
torch, Lightning and transformers and starting CUDA)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from gti.core.config import flatten, not_read, to_yaml
from gti.core.errors import ConfigError, GtiError
from gti.core.io import atomic_write_text
from gti.core.runs import read_run


class StageFailed(GtiError):
    def __init__(self, module: str, returncode: int, where: str):
        super().__init__(f"{module} exited with {returncode}; {where}")
        self.module, self.returncode = module, returncode


@dataclass
class Step:
    """One stage command. `output` is the run folder it makes (None: the stage checks its own outputs, as
    gti.prepare and gti.sids do); `config`, when set, is written as YAML to `argv[0]` just before it runs."""

    module: str  # "gti.ground"
    argv: list[str]  # what follows `python -m module`
    output: Path | None = None
    config: Any = None

    @classmethod
    def from_config(cls, module: str, config: Any, path: Path) -> Step:
        """A stage that reads one YAML file: `config` (its dataclass) goes to `path`, its run folder is output_dir."""
        return cls(module, [str(path)], Path(config.output_dir), config)

    @property
    def stage(self) -> str:
        return self.module.removeprefix("gti.")

    def shell(self) -> str:
        return shlex.join(["python", "-m", self.module, *self.argv])  # quoted so that it pastes into a shell

    def finished(self) -> bool:
        """Whether its run folder is complete. A finished run that was started from other settings than `config`
        is an error, not a skip: a resumed benchmark must not mix cells of two configs in one table."""
        done = self.output is not None and finished(self.output, self.stage)
        if done and self.config is not None:
            self.check_unchanged()
        return done

    def check_unchanged(self) -> None:
        """Compares `config` with the YAML the finished run was started from (argv[0]). Keys only one side has are
        left out: a later gti may add settings whose defaults keep the old behaviour."""
        path = Path(self.argv[0])
        if not path.is_file():
            return
        try:
            old = dict(flatten(yaml.safe_load(path.read_text()) or {}))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        new = dict(flatten(OmegaConf.to_container(OmegaConf.structured(self.config))))
        changed = [f"{k}: {old[k]!r} then, {new[k]!r} now" for k in new
                   if k in old and old[k] != new[k] and k not in RESULT_NEUTRAL and not not_read(k)]  # fmt: skip
        if changed:
            raise ConfigError(
                str(ConfigError.listing(changed, f"{self.output} is finished, but it ran with other settings ({path})"))
                + f"\nmove {self.output} away (or choose another output_dir) to run it again, or restore the settings"
            )


# settings that change how a stage runs, not what it computes: a finished run may differ in these (and in sections
# the stage never reads, gti.core.config.NOT_READ). Some move results in the last bits only, as a thread count
# does (the order of float sums): compiling, extra masked padding, the ranking batch. A benchmark may finish
# faster than it started.
RESULT_NEUTRAL = {
    "resume", "trainer.log_every_n_steps", "trainer.num_workers", "trainer.threads", "trainer.checkpoint_every",
    "trainer.compile", "trainer.compile_mode", "trainer.pad_to_multiple_of", "eval.batch_size",
}  # fmt: skip

HF_STAGES = ("ground", "finetune")  # stages whose run folder holds an HF model/ (read_run checks it)


def finished(folder: Path, stage: str) -> bool:
    """A run folder is renamed into place only once complete (gti.core.runs.RunDir), so a gti.json there means the
    stage finished. It must be a run of `stage`: another stage's folder at that path is an error, not a skip."""
    meta = Path(folder) / "gti.json"
    if not meta.is_file():
        return False
    if stage in HF_STAGES:
        read_run(folder, stage, what=f"{stage} output_dir")
        return True
    try:
        found = json.loads(meta.read_text()).get("stage")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{meta}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if found != stage:
        raise ConfigError(f"{stage} output_dir {folder}: gti.json says stage={found!r}, expected {stage!r}")
    return True


def stage_threads(threads: int, parallel: int) -> int:
    """Each stage gets its share of the cores: torch, MKL and the tokenizers default to every core per process,
    so N processes at once would oversubscribe the machine N-fold."""
    return threads or max(1, (os.cpu_count() or 1) // parallel)


def stage_env(threads: int, parallel: int) -> dict[str, str]:
    n = str(stage_threads(threads, parallel))
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}


class DeviceFault(GtiError):
    """A stage run inside this process hit a GPU fault. CUDA errors are sticky (every later CUDA call in the
    process fails too), so no further stage can run here."""

    def __init__(self, module: str):
        super().__init__(
            f"{module} hit a GPU fault inside this process, which leaves CUDA unusable in it: no further stage can "
            "run here. Run the same command again (finished cells are skipped); in_process=false runs each stage "
            "in its own process, so that a fault ends only its stage"
        )


def device_fault(e: BaseException) -> bool:
    import torch

    return isinstance(e, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(e)


def runs_here(config: Any) -> bool:
    """Whether a stage may run in-process: one process, one device. A Trainer that starts other ranks (DDP, FSDP,
    several devices or nodes) would have Lightning's launcher re-run this process's command line, and leave its
    process group and rank variables to the next stage."""
    t = getattr(config, "trainer", None)
    return t is None or (t.devices == 1 and t.num_nodes == 1 and t.strategy in ("auto", "single_device"))


def run_here(step: Step, threads: int) -> int:
    """`python -m <module> <argv>` inside this process: the stage's main(argv) on `threads` CPU threads. Returns the
    exit status the process would have had (2: a user error, printed; 1: a crash, its traceback printed).
    Afterwards the environment variables are as before, what the stage held is let go (model, optimiser, compiled
    graphs, cached GPU memory) and the peak-memory counters start again, so the next stage's run folder reports its
    own peak (gti.core.runs.peak_memory_mb). Raises KeyboardInterrupt when Ctrl-C stopped the stage (Lightning
    turns it into an exit and ignores further Ctrl-C), DeviceFault after a GPU fault."""
    import gc
    import importlib
    import signal
    import threading
    import traceback

    import torch
    import torch._dynamo

    from gti.core.runs import reset_peak_memory

    before, environ, sigint = torch.get_num_threads(), dict(os.environ), signal.getsignal(signal.SIGINT)
    torch.set_num_threads(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as in a stage process (stage_env)
    reset_peak_memory()
    code, fault = 0, False
    try:
        importlib.import_module(step.module).main(list(step.argv))
    except SystemExit as e:  # what the process would have exited with
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception as e:  # a crash: its traceback, as the process would print it; the benchmark goes on
        traceback.print_exc()
        code, fault = 1, device_fault(e)
    finally:
        torch.set_num_threads(before)
        os.environ.clear()
        os.environ.update(environ)
        interrupted = signal.getsignal(signal.SIGINT) is signal.SIG_IGN and sigint is not signal.SIG_IGN
        if interrupted and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
        try:
            torch._dynamo.reset()  # compiled graphs hold the stage's model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as e:  # after a fault, CUDA calls fail too
            if not device_fault(e):
                raise
            fault = True
    if interrupted:
        raise KeyboardInterrupt
    if fault:
        raise DeviceFault(step.module)
    return code


def run_step(
    step: Step, say: Callable[[str], None], starting: str, env: dict | None = None, log: Path | None = None,
    here: int = 0,
) -> bool:
    """Runs `step` unless its run folder is finished; `say`s which, with `starting` as the line before it runs.
    Output goes to the terminal, or is appended to `log` when stages run side by side. `here` > 0: inside this
    process on that many threads (run_here; not with `log`), else as a new process with `env`. Returns whether it
    ran; raises StageFailed (naming where its output went) when the stage exits non-zero."""
    if step.finished():
        say(f"{step.output} is finished, skipped")
        return False
    say(starting)
    if step.config is not None:
        atomic_write_text(Path(step.argv[0]), to_yaml(step.config))
    if here and not log:
        returncode = run_here(step, here)
    else:
        cmd = [sys.executable, "-m", step.module, *step.argv]
        with log.open("a") if log else nullcontext() as out:
            if out:
                out.write(f"\n==== {' '.join(cmd)}\n")
                out.flush()
            returncode = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None).returncode
    if returncode != 0:
        if log:
            where = f"log: {log}"
        else:
            where = f"its output is above ({step.argv[0]})" if step.config is not None else "its output is above"
        raise StageFailed(step.module, returncode, where)
    return True
