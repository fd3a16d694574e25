"""Vocabulary extension: add new tokens without stray spaces, resize without shrinking (docs/method.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AddedToken

from gti.core.errors import DataError
from gti.data.dataset import parse_sid_token


@dataclass
class NewTokens:
    tokens: list[str]  # in id order
    start: int  # id of tokens[0]; new ids are start .. start + len - 1 (contiguous)
    descriptions: list[list[str]]  # per token: texts that describe it (item texts for SID codes)

    @property
    def ids(self) -> list[int]:
        return list(range(self.start, self.start + len(self.tokens)))

    def __len__(self) -> int:
        return len(self.tokens)


def _sid_sort_key(tok: str) -> tuple:
    sid = parse_sid_token(tok)
    if sid and len(sid[0]) == 1 and sid[0].islower():  # our level letters: by letter, then code
        return (0, *sid)
    return (1, tok, 0)  # any other token after them, in text order


def sid_tokens(index: dict[int, list[str]]) -> list[str]:
    """All distinct SID tokens ordered by level letter, then code."""
    return sorted({t for toks in index.values() for t in toks}, key=_sid_sort_key)


def sid_descriptions(index: dict[int, list[str]], texts: dict[int, str], tokens: list[str]) -> list[list[str]]:
    """For an SID code token: the texts of the items that carry it (docs/method.md, `description`)."""
    by_token: dict[str, list[str]] = {t: [] for t in tokens}
    for item in sorted(index):
        for t in index[item]:
            by_token[t].append(texts[item])
    return [by_token[t] for t in tokens]


def read_tokens_file(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """tokens.jsonl: one {"token": ..., "description": ...} per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    tokens, descs = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("token"), str) or not row["token"]:
                raise DataError(f"{path}: line {lineno}: expected {{\"token\": str, \"description\": str}}")
            desc = row.get("description", "")
            if not isinstance(desc, str) or not desc.strip():
                raise DataError(f"{path}: line {lineno}: token {row['token']!r} has an empty description")
            tokens.append(row["token"])
            descs.append([desc])
    if len(set(tokens)) != len(tokens):
        dup = next(t for t in tokens if tokens.count(t) > 1)
        raise DataError(f"{path}: token {dup!r} appears twice")
    return tokens, descs


def add_tokens(tokenizer, tokens: list[str], descriptions: list[list[str]]) -> NewTokens:
    """Add tokens as non-normalised AddedTokens with lstrip, so ' <a_1>' never leaves a stray space token."""
    vocab = tokenizer.get_vocab()
    existing = [t for t in tokens if t in vocab]
    if existing:
        raise DataError(
            f"{len(existing)} new tokens already exist in the tokenizer vocabulary, e.g. {existing[:3]}; "
            "choose other token strings (or start from the base model, not an extended one)"
        )
    start = len(tokenizer)
    added = tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False, special=False) for t in tokens])
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if added != len(tokens) or ids != list(range(start, start + len(tokens))):
        raise RuntimeError("tokenizer did not assign contiguous ids to the new tokens")
    return NewTokens(list(tokens), start, descriptions)


def resize(model, tokenizer) -> None:
    """Resize to max(len(tokenizer), rows): never shrink spare rows (Qwen/Phi pad the matrix)."""
    rows = model.get_input_embeddings().weight.shape[0]
    target = max(len(tokenizer), rows)
    if target != rows:
        model.resize_token_embeddings(target, mean_resizing=False)


@torch.no_grad()
def set_rows(model, new: NewTokens, input_rows: torch.Tensor, output_rows: torch.Tensor | None) -> None:
    """Write new rows by token id into the input matrix and, for an untied head, the output matrix."""
    ids = torch.tensor(new.ids)
    emb = model.get_input_embeddings().weight
    emb[ids] = input_rows.to(emb.dtype)
    if not is_tied(model):
        head = model.get_output_embeddings()
        head.weight[ids] = (output_rows if output_rows is not None else input_rows).to(head.weight.dtype)


def is_tied(model) -> bool:
    """Whether the output head is the input matrix itself (or absent): one set of rows for both."""
    head = model.get_output_embeddings()
    return head is None or head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
