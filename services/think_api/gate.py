"""The label gate: what of a model reply may leave the API. Only a final part, and only when the reply is clean.

    REFUSE       -> a fixed refusal            ESCALATION -> a fixed hand-off message (escalated)
    ALLOW, DENY  -> the model's final part     malformed, no verdict, thinking repeated -> withheld (fixed text)

The thinking is never returned; only its HMAC under the server secret is (secret.py: it links a response to its
audit row). Every comparison runs on one normaliser (`shared.think_format.fold`: invisible characters dropped,
NFKC, casefold, look-alike letters folded), so a repeat of the thinking disguised with zero-width spaces, word
joiners, soft hyphens or Cyrillic letters, or written backwards, is still a repeat. What it cannot catch: the
thinking paraphrased or translated; only the thinking *section* is guaranteed never to be returned.

Invisible characters (format and default-ignorable code points) are stripped from every answer that leaves, not
withheld: ordinary text carries them (emoji sequences, copied text), and stripped they can neither hide a payload
(tag characters, bidi controls) nor disguise a repeat, which the check judges on the folded text anyway.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from services.think_api.secret import ServerSecret
from shared.think_format import END, EOT, Label, fold, parse, strip_invisible

REFUSAL = "申し訳ありませんが、このご依頼にはお応えできません。\nI'm sorry, but I can't help with that request."
HANDOFF = (
    "このご依頼には専門家（人間）の判断が必要なため、担当者に引き継ぎます。\n"
    "This request needs a human expert's judgement, so it has been handed over to one."
)
WITHHELD = (
    "回答の形式を確認できなかったため、回答を表示できません。\n"
    "The model's reply could not be checked, so it is withheld."
)

# A run of this many characters of the thinking (whitespace ignored, Unicode-folded) found in the final part counts
# as thinking repeated in the answer, unless the run is also in the user's prompt (the thinking restates the
# request; an answer may too). Shorter overlaps (a number, a name, a short phrase) are ordinary.
REPEAT_WINDOW = 16

ReplyStatus = Literal["answered", "denied", "refused", "escalated", "withheld"]


@dataclass(frozen=True)
class Decision:
    status: ReplyStatus
    http_status: int
    answer: str
    label: Label | None
    escalated: bool
    thinking_hmac: str | None  # HMAC-SHA256 of the thinking under the server secret, never its plain SHA-256
    reason: str | None = None  # why a reply was withheld (fixed texts from the parser, never model text)
    thinking_chars: int = 0


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _squash(text: str) -> str:
    return "".join(fold(text).split())


def _grams(text: str, window: int) -> set[str]:
    return {text[i : i + window] for i in range(len(text) - window + 1)}


@functools.lru_cache(maxsize=256)  # a stream checks one thinking against every longer prefix of its final part
def _thinking_grams(thinking: str, prompt: str, window: int) -> frozenset[str]:
    """The thinking's windows, forwards and backwards, less the prompt's (both folded)."""
    squashed, asked = _squash(thinking), _grams(_squash(prompt), window)
    return frozenset((_grams(squashed, window) | _grams(squashed[::-1], window)) - asked)


def repeats_thinking(thinking: str, final: str, prompt: str = "", window: int = REPEAT_WINDOW) -> bool:
    """True if `final` holds `window` consecutive characters of `thinking`, forwards or backwards, that are not from
    `prompt` (all folded: invisible characters, width, case and look-alikes do not count)."""
    return not _thinking_grams(thinking, prompt, window).isdisjoint(_grams(_squash(final), window))


def _withheld(reason: str, secret: ServerSecret, thinking: str | None = None) -> Decision:
    digest, n = (secret.digest(thinking), len(thinking)) if thinking is not None else (None, 0)
    return Decision("withheld", 502, WITHHELD, None, False, digest, reason, n)


def decide(reply: str, prompt: str, secret: ServerSecret) -> Decision:
    """Gate one raw model reply to `prompt`. Total: every input gives a Decision, and none carries thinking text;
    the thinking's digest is keyed with `secret`."""
    p = parse(reply)
    if not p.ok or p.thinking is None or p.final is None:
        return _withheld(p.error or "reply did not parse", secret)
    if p.label is None:
        return _withheld("no verdict line (判定/Verdict) in the thinking", secret, p.thinking)
    digest, n = secret.digest(p.thinking), len(p.thinking)
    if p.label == "REFUSE":
        return Decision("refused", 200, REFUSAL, "REFUSE", False, digest, thinking_chars=n)
    if p.label == "ESCALATION":
        return Decision("escalated", 200, HANDOFF, "ESCALATION", True, digest, thinking_chars=n)
    if repeats_thinking(p.thinking, p.final, prompt):
        return _withheld("thinking text repeated in the final part", secret, p.thinking)
    answer = _LONE_SURROGATE.sub("\ufffd", strip_invisible(p.final))  # a lone surrogate cannot be sent as UTF-8
    if not answer.strip():
        return _withheld("final part is only invisible characters", secret, p.thinking)
    return Decision(
        "answered" if p.label == "ALLOW" else "denied", 200, answer, p.label, False, digest, thinking_chars=n
    )


# --- the same gate on a reply that is still being generated ---

# How much of the final part a stream holds back, in squashed characters (whitespace dropped, Unicode-folded): at
# least REPEAT_WINDOW, so a repeat of the thinking is seen whole before any of it leaves, and at least the longest
# marker a final part may not hold ("verdict:escalation", 18 characters), so none leaves half-written.
STREAM_HOLD = 20
_CLOSE_FINAL = "</final>"  # closes a quadruple final part that is still being written
SENDABLE = ("answered", "denied")  # the statuses whose text is the model's own final part
# A stream judges its reply so far (decide(), linear in its length) at a new piece only while the characters judged
# over the whole stream stay within JUDGE_PER_CHAR per character of the reply plus JUDGE_BASE: a short reply is judged
# at every piece, a long one every 1/JUDGE_PER_CHAR of its length, and a whole stream costs linear time (judging
# every piece was quadratic: 25 s of CPU for an 8000-character reply in 4-character pieces). Text is only released
# by a judgement, so none leaves unjudged; finish() judges the whole reply.
JUDGE_PER_CHAR = 32
JUDGE_BASE = 64 * 1024


def _rescues(text: str) -> list[str]:
    """Continuations that undo every failure that exists only at the very end of `text`: a word character (a
    heading line, a tag like "<final" go on as ordinary text) and the rest of a half-written end-of-turn token
    (the parser strips a whole one at the end)."""
    out = ["a"]
    for tok in (END, EOT):
        k = next((k for k in range(len(tok) - 1, 0, -1) if text.endswith(tok[:k])), 0)
        if k:
            out.append(tok[k:])
    return out


def _hold_cut(answer: str, hold: int = STREAM_HOLD) -> int:
    """Length of the longest prefix of `answer` followed by at least `hold` squashed characters (0 if none).

    Linear in the tail: each character's own squashed length is an upper bound of what it adds beside its
    neighbours (Unicode composition only merges), so the tail is squashed whole only once that bound is reached."""
    k, bound = len(answer), 0
    while k > 0:
        k -= 1
        if answer[k].isspace():  # squashes to nothing
            continue
        grew = len(_squash(answer[k]))
        bound += grew
        if grew and bound >= hold and len(_squash(answer[k:])) >= hold:
            return k
    return 0


class StreamGate:
    """decide(), applied to a reply while it is generated. Nothing leaves before the reply so far passes decide() as
    a whole (thinking complete, verdict found, final part begun); then feed() returns the part of its answer that is
    safe now: decide()'s answer for the reply so far, less a held-back tail of STREAM_HOLD characters. finish()
    gives the rest, from decide() on the whole reply, so what leaves adds up to exactly what /think answers.

    A reply that passed and then fails in a way no continuation can undo fails for good (`failure` is set: send no
    more, end with an error); one that never passed is judged by finish(). REFUSE and ESCALATION release nothing
    before finish(), which gives their fixed text."""

    def __init__(self, prompt: str, secret: ServerSecret):
        self.prompt, self.secret = prompt, secret
        self.reply = ""  # the raw model text so far
        self.sent = ""  # the answer text released so far
        self.failure: Decision | None = None
        self._passed: Decision | None = None  # the last decision on the reply so far that passed
        self._closer = ""
        self._judged = 0  # characters judged so far (the sum of the reply's lengths at each judgement)

    def _passing(self, text: str) -> tuple[Decision, str] | None:
        """decide() on the reply so far, read as complete or (quadruple) with its final part closed: the first
        reading that passes and its closer, if one does."""
        for closer in ("", _CLOSE_FINAL):
            d = decide(text + closer, self.prompt, self.secret)
            if d.status != "withheld":
                return d, closer
        return None

    def _fail(self) -> None:
        """Fail for good, for the reason decide() gives in the reading that passed last."""
        reason = decide(self.reply + self._closer, self.prompt, self.secret).reason or "reply did not parse"
        last = self._passed
        self.failure = (
            _withheld(reason, self.secret)
            if last is None
            else Decision("withheld", 502, WITHHELD, None, False, last.thinking_hmac, reason, last.thinking_chars)
        )

    def _release(self, cleared: str) -> str:
        if cleared.startswith(self.sent):
            new, self.sent = cleared[len(self.sent) :], cleared
            return new
        if not self.sent.startswith(cleared):  # cannot happen while decide() is consistent: fail closed anyway
            self.failure = _withheld("the answer changed after part of it was sent", self.secret)
        return ""

    def feed(self, delta: str) -> str:
        """Add generated text; return the answer text that may be sent now ('' while nothing new is safe)."""
        if self.failure is not None or not delta:
            return ""
        self.reply += delta
        if self._judged + len(self.reply) > JUDGE_PER_CHAR * len(self.reply) + JUDGE_BASE:
            return ""  # judged at a later piece, within the budget
        self._judged += len(self.reply)
        passing = self._passing(self.reply)
        if passing is None:
            if self._passed is not None and all(self._passing(self.reply + r) is None for r in _rescues(self.reply)):
                self._fail()
            return ""
        d, self._closer = passing
        self._passed = d
        return self._release(d.answer[: _hold_cut(d.answer)]) if d.status in SENDABLE else ""

    def finish(self) -> tuple[str, Decision]:
        """The reply is complete: (the answer text not sent yet, the decision on the whole reply)."""
        if self.failure is not None:
            return "", self.failure
        d = decide(self.reply, self.prompt, self.secret)
        if d.status == "withheld":
            self.failure = d
            return "", d
        if d.status not in SENDABLE:
            if self.sent:  # cannot happen: a label's fixed text is never released early
                self.failure = _withheld("the label changed after part of the answer was sent", self.secret)
                return "", self.failure
            self.sent = d.answer
            return d.answer, d
        rest = self._release(d.answer)
        return (rest, d) if self.failure is None else ("", self.failure)
