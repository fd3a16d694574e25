"""Prompt templates and response-only tokenisation.

Grounding (GTI paper §3, design.md §6): six paired tasks in both directions between item text and
SID. Recommendation (paper §4): three phrasings of "history SIDs -> next SID". A template is a
(prompt, response) pair of format strings over {title}, {description}, {sid}, {history}. With a
chat template the prompt becomes a user turn and the response the assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUNDING_TEMPLATES: dict[str, tuple[str, str]] = {
    "title2sid": ("Which item is titled \"{title}\"?", "{sid}"),
    "desc2sid": ("Which item is described as: {description}?", "{sid}"),
    "both2sid": ("Which item is \"{title}\", described as: {description}?", "{sid}"),
    "sid2title": ("What is the title of item {sid}?", "{title}"),
    "sid2desc": ("Describe item {sid}.", "{description}"),
    "sid2both": ("What is item {sid}? Give its title and description.", "{title}. {description}"),
}

REC_TEMPLATES: list[tuple[str, str]] = [
    ("A user interacted with these items in order: {history}. Which item comes next?", "{sid}"),
    ("Here is a user's history: {history}. Recommend the next item for this user.", "{sid}"),
    ("Given the items {history} that the user engaged with, predict the next one.", "{sid}"),
]


def sid_string(tokens: list[str]) -> str:
    return "".join(tokens)  # no spaces: SID tokens are added with lstrip, and never need them


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt: the loss covers the response only


class PromptFormatter:
    """Turns (prompt, response) strings into token ids with a response-only label mask."""

    def __init__(self, tokenizer, use_chat_template: bool = True, system_prompt: str = ""):
        self.tok = tokenizer
        self.chat = use_chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.system_prompt = system_prompt
        self.eos = tokenizer.eos_token_id

    def prompt_text(self, prompt: str) -> str:
        if not self.chat:
            return f"{prompt}\nAnswer: "
        # an explicit (possibly empty) system turn keeps templates from injecting a long default one
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tok(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]

    def encode(self, prompt: str, response: str, max_length: int) -> Encoded:
        # prompt and response are tokenised separately so the mask boundary is exact
        p = self.prompt_ids(prompt)
        r = self.tok(response, add_special_tokens=False)["input_ids"] + [self.eos]
        if len(r) >= max_length:
            r = r[: max_length - 1]
        p = p[-(max_length - len(r)) :] if len(p) + len(r) > max_length else p  # keep the end of the prompt
        return Encoded(p + r, [-100] * len(p) + r)


def render(template: tuple[str, str], **fields: str) -> tuple[str, str]:
    prompt, response = template
    return prompt.format(**fields), response.format(**fields)


def pad_batch(rows: list[Encoded], pad_id: int, left: bool = False) -> dict:
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        sl = slice(width - n, width) if left else slice(0, n)
        ids[i, sl] = torch.tensor(r.input_ids)
        labels[i, sl] = torch.tensor(r.labels)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
