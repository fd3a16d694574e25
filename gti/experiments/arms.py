"""The arms compared: how each one starts the new SID rows before fine-tuning. Both the benchmark matrix and the
published-protocol presets read this one table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    init: str  # init strategy of the new rows when fine-tuning starts from the base model (gti.tokens.init_strategies)
    ground: str | None = None  # init the grounding stage starts from; None: no grounding, fine-tune directly
    multitask: bool = False  # mix LC-Rec's text<->SID tasks into fine-tuning

    @property
    def grounds(self) -> bool:
        return self.ground is not None


ARMS: dict[str, Arm] = {
    "random": Arm("random"),
    "mean": Arm("mean"),
    "description": Arm("description"),
    "topk": Arm("topk"),
    "gti-mean": Arm("mean", ground="mean"),  # the paper
    "gti-description": Arm("description", ground="description"),  # ours: GTI warm-started from descriptions
    "gti-random": Arm("random", ground="random"),  # distinct rows from the start, then grounded
    "multitask-mean": Arm("mean", multitask=True),  # LC-Rec-style multi-task SFT
}

# The protocol configs name their arms the way the papers' tables do; each is one row of ARMS.
PROTOCOL_ARMS: dict[str, str] = {"gti": "gti-mean", "mean": "mean", "multitask": "multitask-mean"}


def protocol_arm(name: str) -> Arm:
    return ARMS[PROTOCOL_ARMS[name]]
