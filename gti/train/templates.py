"""Prompt templates and response-only tokenisation.

Grounding (GTI paper §3, docs/method.md): six paired tasks in both directions between item text and
SID. Recommendation (paper §4): three phrasings of "history SIDs -> next SID". A template is a
(prompt, response) pair of format strings over {title}, {description}, {sid}, {history}. With a
chat template the prompt becomes a user turn and the response the assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from gti.core.errors import ConfigError

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


FREE_TEXT = ("description", "title")  # the fields shortened to fit max_length, in this order


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
        self._frame: tuple[str, str] | tuple[()] | None = None  # see prompt_text

    def prompt_text(self, prompt: str) -> str:
        if not self.chat:
            return f"{prompt}\nAnswer: "
        if self._frame is None:
            self._frame = self._chat_frame()
        if self._frame:  # the chat template only wraps the prompt: two string joins instead of a Jinja render
            return self._frame[0] + prompt + self._frame[1]
        return self._render_chat(prompt)

    def _render_chat(self, prompt: str) -> str:
        # an explicit (possibly empty) system turn keeps templates from injecting a long default one
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _chat_frame(self) -> tuple[str, str] | tuple[()]:
        """(head, tail) around the user's text when the chat template renders it verbatim, else ()."""
        mark = "\x00PROMPT\x00"
        parts = self._render_chat(mark).split(mark)
        if len(parts) != 2:
            return ()
        probe = " Which item is <a_1>? \"x\" & y "  # a template that edits its text (strip, escape) is not a frame
        return (parts[0], parts[1]) if self._render_chat(probe) == parts[0] + probe + parts[1] else ()

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tok(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]

    def encode(self, prompt: str, response: str, max_length: int) -> Encoded:
        """Never cuts: cutting a prompt's head drops SIDs and the chat frame (docs/traps.md). Rows
        with free text go through encode_fields, which shortens that text to fit."""
        enc = self._encode(prompt, response)
        if len(enc.input_ids) > max_length:
            raise ConfigError(
                f"max_length={max_length} is too short: a row needs {len(enc.input_ids)} tokens ({prompt[:80]!r}...)"
            )
        return enc

    def _encode(self, prompt: str, response: str) -> Encoded:
        # prompt and response are tokenised separately so the mask boundary is exact
        p = self.prompt_ids(prompt)
        r = self.tok(response, add_special_tokens=False)["input_ids"] + [self.eos]
        return Encoded(p + r, [-100] * len(p) + r)

    def encode_many(self, specs: list[tuple[tuple[str, str], dict[str, str], str]], max_length: int) -> tuple[list[Encoded], int]:
        """encode_fields over many (template, fields, what) at once: one batched call of the fast tokenizer for
        every prompt and every response; only rows over max_length take the per-row shortening path.
        Returns the rows and how many were shortened."""
        texts = [render(template, **fields) for template, fields, _ in specs]
        prompts = self.tok([self.prompt_text(p) for p, _ in texts], add_special_tokens=False)["input_ids"] if texts else []
        responses = self.tok([r for _, r in texts], add_special_tokens=False)["input_ids"] if texts else []
        rows, shortened = [], 0
        for (template, fields, what), p, r in zip(specs, prompts, responses):
            if len(p) + len(r) + 1 <= max_length:
                rows.append(Encoded(p + r + [self.eos], [-100] * len(p) + r + [self.eos]))
                continue
            row, cut = self.encode_fields(template, fields, max_length, what)
            rows.append(row)
            shortened += cut
        return rows, shortened

    def encode_fields(
        self, template: tuple[str, str], fields: dict[str, str], max_length: int, what: str
    ) -> tuple[Encoded, bool]:
        """Render and encode within max_length by shortening the free text (FREE_TEXT order) by tokens,
        wherever it sits, prompt or response; SIDs, the chat frame and EOS stay whole. Returns the row
        and whether it was shortened; `what` names the row in the error when even empty text is too long."""
        enc = self._encode(*render(template, **fields))
        if len(enc.input_ids) <= max_length:
            return enc, False
        fields = dict(fields)
        for name in FREE_TEXT:
            if "{" + name + "}" not in template[0] + template[1]:
                continue
            ids = self.tok(fields[name], add_special_tokens=False)["input_ids"]
            keep = len(ids)
            # in context a field tokenises about as it does alone, so one re-encode usually fits; each
            # round drops at least one more token, so the loop ends
            while len(enc.input_ids) > max_length and keep > 0:
                keep = max(0, keep - (len(enc.input_ids) - max_length))
                text = self.tok.decode(ids[:keep], clean_up_tokenization_spaces=False)
                fields[name] = text.rstrip("\ufffd").rstrip()  # a cut may split a UTF-8 character
                enc = self._encode(*render(template, **fields))
            if len(enc.input_ids) <= max_length:
                return enc, True
        n = len(enc.input_ids)  # every free field is empty now: the least this row can take
        raise ConfigError(f"{what} needs {n} tokens with its text emptied; raise max_length to at least {n}")


def render(template: tuple[str, str], **fields: str) -> tuple[str, str]:
    prompt, response = template
    return prompt.format(**fields), response.format(**fields)


def render_rec(index: dict[int, list[str]], history, target: int | None, template: int) -> tuple[str, str]:
    """Rec template `template` over history items and a target item (None: no response, a prompt only)."""
    sid = "" if target is None else sid_string(index[target])
    return render(REC_TEMPLATES[template], history=", ".join(sid_string(index[i]) for i in history), sid=sid)
