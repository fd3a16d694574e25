"""Shared fixtures: the real SmolLM2 tokenizer on a tiny random Llama (resources.md)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from gti.assets import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer_path(smollm2_path):
    return smollm2_path


@pytest.fixture()
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def make_tiny_llama(vocab_size: int, tied: bool = True, seed: int = 0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(  # **config: overrides (e.g. initializer_range for sharper logits)
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **config,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


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
