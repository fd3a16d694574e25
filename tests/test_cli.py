"""The command line: `--help` on every command (read from the schemas), the `gti` script and its subcommands."""

from __future__ import annotations

import importlib
import subprocess
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gti.__main__ import COMMANDS
from gti.__main__ import main as gti_main
from gti.core.cli import describe, field_comments, help_text, summary
from gti.core.config import FinetuneConfig, GroundConfig, PrepareConfig, SidsConfig
from gti.core.errors import ConfigError, DataError
from gti.experiments.benchmark import BenchmarkConfig
from gti.experiments.protocol import ProtocolConfig

SCHEMAS = {
    "prepare": PrepareConfig,
    "sids": SidsConfig,
    "ground": GroundConfig,
    "finetune": FinetuneConfig,
    "benchmark": BenchmarkConfig,
    "protocol": ProtocolConfig,
}


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@dataclass
class Inner:
    # a comment line directly above
    # and a second one
    a: int = 1  # beside it
    b: list[str] = field(
        default_factory=lambda: ["x"]
    )  # beside the last line of a field written over three lines
    # a comment followed by a blank line belongs to no field

    c: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(a=2))  # the section's own comment
    flag: bool = True


def test_field_comments_read_from_the_source():
    assert field_comments(Inner) == {
        "a": "a comment line directly above and a second one beside it",
        "b": "beside the last line of a field written over three lines",
        "c": "",
    }


def test_describe_expands_sections_with_the_parents_defaults():
    keys = describe(Outer)
    assert [(k.key, k.type, k.section) for k in keys] == [
        ("inner", "Inner", True), ("inner.a", "int", False), ("inner.b", "list[str]", False),
        ("inner.c", "str | None", False), ("flag", "bool", False),
    ]  # fmt: skip
    assert [k.default for k in keys[1:]] == [2, ["x"], None, True]  # inner.a: the parent's factory sets 2
    assert keys[0].comment == "the section's own comment"


def test_help_text_lists_key_type_default_and_comment():
    text = help_text('"""`tool x=1` — does a thing."""', Outer)
    assert "  inner.a: int = 2\n      a comment line directly above and a second one beside it\n" in text
    assert "  inner.b: list[str] = [x]\n" in text and "  inner.c: str | None = null\n" in text
    assert text.endswith("  flag: bool = true")
    assert summary("`tool x=1` — does a thing.\n\nmore") == "does a thing"


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_help_lists_its_real_keys(name, flag, capsys):
    module = importlib.import_module(f"gti.{name}")
    code, out, err = run_main(module.main, ["trainer.max_steps=3", flag], capsys)
    assert code == 0 and err == ""
    assert out.startswith(module.__doc__.strip().splitlines()[0])
    keys = describe(SCHEMAS[name])
    assert sum(not k.section for k in keys) >= 7
    for k in keys:  # every key, with its type and default, and its comment (possibly wrapped) below it
        assert f"  {k.key}: {k.type}" in out
        if k.comment:
            assert " ".join(k.comment.split()[:4]) in " ".join(out.split())


def test_help_shows_a_known_key_in_full(capsys):
    from gti.ground import main

    _, out, _ = run_main(main, ["--help"], capsys)
    assert "  trainer.precision: str = 32-true\n      32-true | bf16-mixed | bf16-true | ...; in bf16" in out
    assert "  optim.warmup_steps: int = 10\n" in out  # GroundConfig's own default, not OptimConfig's 0


def test_diagnose_help(capsys):
    from gti.diagnose import main

    code, out, _ = run_main(main, ["--help"], capsys)
    assert code == 0 and out.startswith("`python -m gti.diagnose RUN_DIR`") and "Config keys" not in out


def test_gti_help_lists_every_command(capsys):
    code, out, _ = run_main(gti_main, ["--help"], capsys)
    lines = out.split("commands:\n")[1].splitlines()
    assert code == 0 and [line.split()[0] for line in lines] == list(COMMANDS)
    assert all(len(line.split()) > 3 for line in lines)  # each with what it does


def test_unknown_subcommand_exits_2_naming_the_choices(capsys):
    code, out, err = run_main(gti_main, ["grund", "trainer.max_steps=1"], capsys)
    assert code == 2 and out == ""
    assert "unknown command 'grund'" in err and ", ".join(COMMANDS) in err and "did you mean 'ground'" in err


def test_gti_subcommand_help_is_the_module_help(capsys):
    from gti.ground import main

    _, via_gti, _ = run_main(gti_main, ["ground", "--help"], capsys)
    _, via_module, _ = run_main(main, ["--help"], capsys)
    assert via_gti == via_module


def test_gti_subcommand_passes_its_arguments(capsys):
    code, _, err = run_main(gti_main, ["ground", "trainer.max_stepz=3"], capsys)
    assert code == 2 and "unknown key 'trainer.max_stepz'" in err


def test_installed_gti_script():
    script = Path(sysconfig.get_path("scripts")) / "gti"
    assert script.is_file(), f"no {script}: install the package (`pip install -e .`, as `make setup` does)"
    r = subprocess.run([str(script), "sids", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("`python -m gti.sids") and "  sids.quantizer" not in r.stdout
    assert "  quantizer: str = rqkmeans\n      rqkmeans | rqvae\n" in r.stdout


def test_config_problems_listed_by_one_builder():
    assert str(ConfigError.listing(["a", "b"])) == "invalid config:\n  - a\n  - b"
    assert str(ConfigError.listing(["a"], "invalid sids config")) == "invalid sids config:\n  - a"
    e = DataError.listing(["no x.json"], "missing input files")
    assert isinstance(e, DataError) and str(e) == "missing input files:\n  - no x.json"
