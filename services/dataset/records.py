"""Validate one input line of the prototype's four-class JSONL into a `Source`, or say exactly why not."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from shared.think_format import LABELS

TEXT_FIELDS = ("instruction", "input", "output", "text", "title", "keyword", "system")
LABEL_FIELDS = ("four_class_label", "domain_label", "safety_label")
_LETTER = re.compile(r"[^\W\d_]")
_JA = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")


class Reject(Exception):
    """A line that cannot become a record: `reason` is a stable code, `field` the offending key if any."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.reason, self.message, self.field = reason, message, field


@dataclass(frozen=True)
class Source:
    """A validated request: what the user asks, the reference answer (if any) and the labels."""

    user: str
    answer: str
    system: str
    label: str
    domain: str
    safety: str
    lang: str


def detect_lang(text: str) -> str:
    """'ja' when Japanese script makes up a noticeable share of the text, else 'en'."""
    if not text:
        return "ja"
    ja = len(_JA.findall(text))
    letters = len(_LETTER.findall(text)) or 1
    return "ja" if ja / letters >= 0.1 else "en"


def _text_field(obj: dict, name: str) -> str:
    value = obj.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Reject("wrong_type", f"field '{name}' must be a string, got {type(value).__name__}", name)
    return value.strip()


def _title_prompt(topic: str, lang: str) -> str:
    return f"「{topic}」について教えてください。" if lang == "ja" else f"Tell me about {topic}."


def _from_bare_text(text: str, title: str, keyword: str) -> tuple[str, str]:
    """The prototype's web records: a document with an optional title/keyword becomes a question and its answer."""
    lang = detect_lang(title + keyword + text)
    if title or keyword:
        return _title_prompt(title or keyword, lang), text
    first, _, rest = text.partition("\n")
    if rest.strip():  # the first line reads as the document's title
        return _title_prompt(first.strip().rstrip("。.:："), lang), rest.strip()
    head = re.split(r"(?<=[。.!?！？])", text, maxsplit=1)[0].strip()
    return _title_prompt(head[:60].rstrip("。.!?！？"), lang), text


def parse_line(raw: bytes) -> tuple[dict, Source]:
    """Decode and validate one JSONL line. Raises Reject with a reason code and a message naming the field."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Reject("invalid_utf8", f"invalid UTF-8 at byte {err.start}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise Reject("invalid_json", f"invalid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise Reject("not_an_object", f"expected a JSON object, got {type(obj).__name__}")

    fields = {name: _text_field(obj, name) for name in TEXT_FIELDS}
    labels = {}
    for name in LABEL_FIELDS:
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise Reject("wrong_type", f"field '{name}' must be a string, got {type(value).__name__}", name)
        labels[name] = (value or "").strip()

    label = labels["four_class_label"].upper()
    if not label:
        raise Reject("missing_field", "field 'four_class_label' is missing", "four_class_label")
    if label not in LABELS:
        raise Reject(
            "unknown_label",
            f"field 'four_class_label': unknown label {labels['four_class_label']!r} (expected {', '.join(LABELS)})",
            "four_class_label",
        )

    if fields["instruction"]:
        user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
        answer = fields["output"]
    elif fields["text"]:
        user, answer = _from_bare_text(fields["text"], fields["title"], fields["keyword"])
    elif any(k in obj for k in ("instruction", "text")):
        key = "instruction" if "instruction" in obj else "text"
        raise Reject("empty_text", f"field '{key}' is empty", key)
    else:
        raise Reject("missing_field", "record has neither 'instruction' nor 'text'", "instruction")

    if label == "ALLOW" and not answer:
        raise Reject("missing_field", "field 'output' is missing or empty (an ALLOW record needs the answer)", "output")

    source = Source(
        user=user,
        answer=answer,
        system=fields["system"],
        label=label,
        domain=labels["domain_label"],
        safety=labels["safety_label"],
        lang=detect_lang(user),
    )
    return obj, source
