"""Shared fixtures: the real SmolLM2 tokenizer on a tiny random Llama."""

from __future__ import annotations

import os

import pytest

from gti.testing import make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from gti.core.assets import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer_path(smollm2_path):
    return smollm2_path


@pytest.fixture()
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture()
def tiny_model(tokenizer):
    return make_tiny_llama(len(tokenizer), tied=True)


@pytest.fixture()
def tiny_untied_model(tokenizer):
    return make_tiny_llama(len(tokenizer), tied=False)


def _save_tiny(out, smollm2_path, tied: bool, **config) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    make_tiny_llama(len(tok), tied=tied, **config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path):
    """A saved tiny tied Llama + the real tokenizer: loads with plain `from_pretrained`."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama"), smollm2_path, tied=True)


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory, smollm2_path):
    return _save_tiny(tmp_path_factory.mktemp("tiny-llama-untied"), smollm2_path, tied=False)
