"""The /think format (fixed by docs/design.md "The /think format"): one renderer and one total parser.

Phi-3.5 chat template::

    <|system|>\\n{system}<|end|>\\n<|user|>\\n{user}<|end|>\\n<|assistant|>\\n{assistant}<|end|>\\n

Assistant text, simple format::

    # 思考ステップ\\n{thinking}\\n\\n# 最終回答\\n{final}

Quadruple format::

    <think-task>…</think-task><think-safety>…</think-safety><think-policy>…</think-policy><final>…</final>

The four-class label lives in the thinking as a verdict line (``判定: ALLOW`` or ``Verdict: ALLOW``).
The parser never returns thinking text as the answer: on malformed output ``final`` is ``None``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

SYSTEM, USER, ASSISTANT, END, EOT = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"
TEMPLATE_TOKENS = (SYSTEM, USER, ASSISTANT, END, EOT)
STOP_TOKENS = (END, USER, ASSISTANT, SYSTEM, EOT)

LABELS = ("ALLOW", "ESCALATION", "DENY", "REFUSE")
Label = Literal["ALLOW", "ESCALATION", "DENY", "REFUSE"]
Format = Literal["simple", "quadruple"]
FORMATS: tuple[Format, ...] = ("simple", "quadruple")

THINK_HEADING = "# 思考ステップ"
FINAL_HEADING = "# 最終回答"

# The Jinja template of Phi-3.5-mini-instruct (what HF's apply_chat_template runs); render_chat is its twin.
PHI35_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

_VERDICT_RE = re.compile(r"^(?:判定|Verdict)\s*[:：]\s*(ALLOW|ESCALATION|DENY|REFUSE)\s*$", re.MULTILINE)
# Anything that looks like one of our tags once Unicode look-alikes are folded (fullwidth <, case, spaces).
_TAG_RE = re.compile(r"<\s*/?\s*(think[\w-]*|final)\b", re.IGNORECASE)
_QUAD_RE = re.compile(
    r"\s*<think-task>(?P<task>.*?)</think-task>\s*<think-safety>(?P<safety>.*?)</think-safety>\s*"
    r"<think-policy>(?P<policy>.*?)</think-policy>\s*<final>(?P<final>.*?)</final>\s*",
    re.DOTALL,
)


@dataclass(frozen=True)
class Thinking:
    """The thinking of one answer: three parts in the quadruple format, `task` alone in the simple one."""

    task: str
    safety: str = ""
    policy: str = ""

    def text(self) -> str:
        return "\n\n".join(p for p in (self.task, self.safety, self.policy) if p)


@dataclass(frozen=True)
class Parsed:
    """Result of parsing model output. `ok` means thinking and final came apart cleanly, in order."""

    ok: bool
    format: Format | None
    thinking: str | None
    final: str | None
    label: Label | None
    error: str | None = None


def verdict_line(label: Label, lang: str = "ja") -> str:
    return f"{'判定' if lang == 'ja' else 'Verdict'}: {label}"


def find_label(thinking: str) -> Label | None:
    found = _VERDICT_RE.findall(thinking)
    return found[-1] if found else None


# Characters that render as nothing: every format character (category Cf: zero-width space and joiners, soft
# hyphen, word joiner, BOM, bidi controls, tag characters) and the other default-ignorable code points (variation
# selectors, combining grapheme joiner, Hangul fillers, Mongolian free variation selectors). Unicode 15.1.
_INVISIBLE = (
    "\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001345f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
)
_INVISIBLE_RE = re.compile(f"[{_INVISIBLE}]+")


def strip_invisible(text: str) -> str:
    """`text` without the characters that render as nothing (format and default-ignorable code points)."""
    return _INVISIBLE_RE.sub("", text)


def fold(text: str) -> str:
    """The one normaliser of every check that compares text (tags, headings, verdicts, the gate's repeat check):
    invisible characters dropped, NFKC, casefold, then look-alikes NFKC leaves alone folded to Latin. Whitespace
    is kept (line-based checks need it)."""
    return unicodedata.normalize("NFKC", strip_invisible(text)).casefold().translate(_LOOKALIKES)


# Look-alikes NFKC leaves as they are: other angle brackets, and Cyrillic/Greek/Armenian letters that look Latin.
_LOOKALIKES = str.maketrans(
    {
        **dict.fromkeys("‹〈《⟨˂❮〈ᐸ", "<"),
        "а": "a",
        "α": "a",
        "с": "c",
        "е": "e",
        "һ": "h",
        "і": "i",
        "ı": "i",
        "ɪ": "i",
        "ι": "i",
        "к": "k",
        "κ": "k",
        "ӏ": "l",
        "ⅼ": "l",
        "ո": "n",
        "η": "n",
        "о": "o",
        "ο": "o",
        "р": "p",
        "ѕ": "s",
        "т": "t",
        "τ": "t",
        "у": "y",
    }
)


def has_tag(text: str) -> bool:
    """True if `text` holds anything tag-like of ours, Unicode look-alikes and case included."""
    return bool(_TAG_RE.search(fold(text))) or bool(_TAG_RE.search(text))


_HEADING_WORDS = (THINK_HEADING.lstrip("# "), FINAL_HEADING.lstrip("# "))
# A verdict anywhere, in any case or width: in a final part it means thinking came after the answer.
_ANY_VERDICT_RE = re.compile(r"(?:判定|verdict)\s*[:：]\s*(?:allow|escalation|deny|refuse)", re.IGNORECASE)


def has_heading(text: str) -> bool:
    """True if a line of `text` is one of our headings, decorated or not (`#思考ステップ`, `## 最終回答:`)."""
    return any("".join(line.split()).strip("#*_=:：-|>") in _HEADING_WORDS for line in fold(text).splitlines())


def has_template_token(text: str) -> bool:
    folded = fold(text)
    return any(tok in text or tok in folded for tok in TEMPLATE_TOKENS)


def render_assistant(thinking: Thinking, final: str, fmt: Format) -> str:
    """Assistant text in the given format. Raises ValueError on parts that would not parse back."""
    for name, part in (
        ("task", thinking.task),
        ("safety", thinking.safety),
        ("policy", thinking.policy),
        ("final", final),
    ):
        if has_tag(part) or has_heading(part) or has_template_token(part):
            raise ValueError(f"{name} part contains a format marker or template token")
    if not final.strip():
        raise ValueError("final part is empty")
    if fmt == "simple":
        return f"{THINK_HEADING}\n{thinking.text()}\n\n{FINAL_HEADING}\n{final}"
    if fmt == "quadruple":
        return (
            f"<think-task>{thinking.task}</think-task><think-safety>{thinking.safety}</think-safety>"
            f"<think-policy>{thinking.policy}</think-policy><final>{final}</final>"
        )
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Render role/content messages exactly as the Phi-3.5 chat template does."""
    out = []
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system" and content:
            out.append(f"{SYSTEM}\n{content}{END}\n")
        elif role == "user":
            out.append(f"{USER}\n{content}{END}\n")
        elif role == "assistant":
            out.append(f"{ASSISTANT}\n{content}{END}\n")
    out.append(f"{ASSISTANT}\n" if add_generation_prompt else EOT)
    return "".join(out)


def _bad(fmt: Format | None, error: str) -> Parsed:
    return Parsed(ok=False, format=fmt, thinking=None, final=None, label=None, error=error)


def _clean_tail(text: str) -> str:
    """Strip a trailing end-of-turn token the server may leave when it was not used as a stop."""
    text = text.rstrip()
    for tok in (EOT, END):
        if text.endswith(tok):
            text = text[: -len(tok)].rstrip()
    return text


def _parse_quadruple(text: str) -> Parsed:
    m = _QUAD_RE.fullmatch(text)
    if not m:
        return _bad("quadruple", "tags missing, unclosed, out of order or text outside them")
    parts = {k: m.group(k) for k in ("task", "safety", "policy", "final")}
    for name, part in parts.items():
        if has_tag(part):
            return _bad("quadruple", f"tag inside the {name} part")
    final = parts["final"].strip()
    thinking = Thinking(parts["task"].strip(), parts["safety"].strip(), parts["policy"].strip()).text()
    return _checked("quadruple", thinking, final)


def _parse_simple(text: str) -> Parsed:
    lines = text.split("\n")
    if lines[0].strip() != THINK_HEADING:
        return _bad("simple", "output does not start with the thinking heading")
    finals = [i for i, line in enumerate(lines) if line.strip() == FINAL_HEADING]
    if not finals:
        return _bad("simple", "no final-answer heading")
    if len(finals) > 1:
        return _bad("simple", "final-answer heading repeated")
    thinks = [i for i, line in enumerate(lines) if line.strip() == THINK_HEADING]
    if len(thinks) > 1:
        return _bad("simple", "thinking heading repeated")
    cut = finals[0]
    thinking = "\n".join(lines[1:cut]).strip()
    final = "\n".join(lines[cut + 1 :]).strip()
    if has_tag(thinking) or has_tag(final):
        return _bad("simple", "quadruple tag inside a simple-format answer")
    return _checked("simple", thinking, final)


def _checked(fmt: Format, thinking: str, final: str) -> Parsed:
    if not final:
        return _bad(fmt, "final part is empty")
    if has_heading(final):
        return _bad(fmt, "heading inside the final part")
    if _ANY_VERDICT_RE.search(fold(final)):
        return _bad(fmt, "verdict line inside the final part")
    if has_template_token(final) or has_template_token(thinking):
        return _bad(fmt, "template token leaked into the output")
    return Parsed(ok=True, format=fmt, thinking=thinking, final=final, label=find_label(thinking))


def parse(output: str) -> Parsed:
    """Split model output into (thinking, final, label). Total: never raises, never leaks thinking as final."""
    if not isinstance(output, str):
        return _bad(None, "output is not text")
    text = _clean_tail(output).strip()
    if not text:
        return _bad(None, "empty output")
    if text.startswith("<"):
        return _parse_quadruple(text)
    if text.startswith("#"):
        return _parse_simple(text)
    if has_tag(text) or has_heading(text):
        return _bad(None, "text before the first thinking marker")
    return _bad(None, "no thinking section")


_SYSTEM_PROMPTS = {
    "simple": (
        "あなたは安全性に配慮するアシスタントです。まず「# 思考ステップ」の見出しの下で、依頼の内容、安全性の評価"
        "（最後に「判定: ALLOW / ESCALATION / DENY / REFUSE」のいずれか）、適用する方針を考えます。"
        "次に「# 最終回答」の見出しの下に、利用者に見せる回答だけを書きます。"
    ),
    "quadruple": (
        "あなたは安全性に配慮するアシスタントです。<think-task>に依頼の内容、<think-safety>に安全性の評価"
        "（最後に「判定: ALLOW / ESCALATION / DENY / REFUSE」のいずれか）、<think-policy>に適用する方針を書き、"
        "最後に<final>へ利用者に見せる回答だけを書きます。"
    ),
}


def system_prompt(fmt: Format) -> str:
    """The system prompt of a format: used in the training records, the Modelfile's SYSTEM and the think API."""
    if fmt not in _SYSTEM_PROMPTS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    return _SYSTEM_PROMPTS[fmt]
