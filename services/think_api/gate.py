"""The label gate: what of a model reply may leave the API. Only a final part, and only when the reply is clean.

    REFUSE       -> a fixed refusal            ESCALATION -> a fixed hand-off message (escalated)
    ALLOW, DENY  -> the model's final part     malformed, no verdict, thinking repeated -> withheld (fixed text)

The thinking is never returned; only its SHA-256 is (and goes to the audit log).
"""
from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

from shared.think_format import Label, parse

REFUSAL = "申し訳ありませんが、このご依頼にはお応えできません。\nI'm sorry, but I can't help with that request."
HANDOFF = ("このご依頼には専門家（人間）の判断が必要なため、担当者に引き継ぎます。\n"
           "This request needs a human expert's judgement, so it has been handed over to one.")
WITHHELD = ("回答の形式を確認できなかったため、回答を表示できません。\n"
            "The model's reply could not be checked, so it is withheld.")

# A run of this many characters of the thinking (whitespace ignored, Unicode-folded) found in the final part counts
# as thinking repeated in the answer, unless the run is also in the user's prompt (the thinking restates the
# request; an answer may too). Shorter overlaps (a number, a name, a short phrase) are ordinary.
REPEAT_WINDOW = 16


@dataclass(frozen=True)
class Decision:
    status: str  # answered | denied | refused | escalated | withheld
    http_status: int
    answer: str
    label: Label | None
    escalated: bool
    thinking_sha256: str | None
    reason: str | None = None  # why a reply was withheld (fixed texts from the parser, never model text)
    thinking_chars: int = 0


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _squash(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def _grams(text: str, window: int) -> set[str]:
    return {text[i:i + window] for i in range(len(text) - window + 1)}


def repeats_thinking(thinking: str, final: str, prompt: str = "", window: int = REPEAT_WINDOW) -> bool:
    """True if `final` holds `window` consecutive characters of `thinking` that are not from `prompt`."""
    grams = _grams(_squash(thinking), window) - _grams(_squash(prompt), window)
    return not grams.isdisjoint(_grams(_squash(final), window))


def _withheld(reason: str, thinking: str | None = None) -> Decision:
    digest, n = (sha256(thinking), len(thinking)) if thinking is not None else (None, 0)
    return Decision("withheld", 502, WITHHELD, None, False, digest, reason, n)


def decide(reply: str, prompt: str = "") -> Decision:
    """Gate one raw model reply to `prompt`. Total: every input gives a Decision, and none carries thinking text."""
    p = parse(reply)
    if not p.ok or p.thinking is None or p.final is None:
        return _withheld(p.error or "reply did not parse")
    if p.label is None:
        return _withheld("no verdict line (判定/Verdict) in the thinking", p.thinking)
    digest, n = sha256(p.thinking), len(p.thinking)
    if p.label == "REFUSE":
        return Decision("refused", 200, REFUSAL, "REFUSE", False, digest, thinking_chars=n)
    if p.label == "ESCALATION":
        return Decision("escalated", 200, HANDOFF, "ESCALATION", True, digest, thinking_chars=n)
    if repeats_thinking(p.thinking, p.final, prompt):
        return _withheld("thinking text repeated in the final part", p.thinking)
    return Decision("answered" if p.label == "ALLOW" else "denied", 200, p.final, p.label, False, digest,
                    thinking_chars=n)
