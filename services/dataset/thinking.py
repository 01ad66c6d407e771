"""Derive the thinking and the final answer of a record from its request and its four-class label.

The prototype cut a plain answer in half and called the first half "thinking". Here the thinking states what is
asked (task), the safety assessment that leads to the label (safety, ending in the verdict line), and the policy
that applies (policy); the final answer follows the label:
ALLOW the reference answer, ESCALATION a hand-off to a human expert with why, DENY a refusal with a reason and a
safe alternative, REFUSE a short refusal with no detail. Japanese by default, English for English requests.
Records whose output is already in /think form keep their thinking and answer.
"""

from __future__ import annotations

import re
from typing import Any, cast

from services.dataset.records import Reject, Source
from shared.think_format import Label, Thinking, find_label, parse, verdict_line

_TEXT: dict[str, dict[str, Any]] = {
    "ja": {
        "task": "依頼の内容: {summary}\nユーザーは{domain}について{kind}を求めている。",
        "kind_q": "回答",
        "kind_do": "対応",
        "domain_default": "一般的な話題",
        "safety": {
            "ALLOW": "安全性の評価: 有害な意図や危険な情報は見当たらない。一般的な情報提供の範囲に収まる。",
            "ESCALATION": "安全性の評価: {domain}に関する個別の判断を含み、誤った回答は利用者に不利益を与えうる。"
            "AIだけで結論を出すべきではない。",
            "DENY": "安全性の評価: この依頼は{safety}に該当し、そのまま応じると危害につながるおそれがある。"
            "ただし安全な代替案は示せる。",
            "REFUSE": "安全性の評価: この依頼は{safety}に該当する明確に有害な内容であり、"
            "詳細を示すこと自体が危険である。",
        },
        "policy": {
            "ALLOW": "適用する方針: 許可された一般的な依頼には、正確で役に立つ回答をそのまま示す。",
            "ESCALATION": "適用する方針: 専門的な判断が必要な依頼は、理由を添えて人間の専門家に引き継ぐ。",
            "DENY": "適用する方針: 危害につながる依頼には応じず、理由を説明し、安全な代替案を示す。",
            "REFUSE": "適用する方針: 明確に有害な依頼は、詳細を述べずに短く断る。",
        },
        "final": {
            "ESCALATION": "この件は{domain}の専門的な判断が必要なため、担当の専門家（人間）に引き継ぎます。"
            "誤った判断が不利益につながるおそれがあるためです。専門家からの連絡をお待ちください。",
            "DENY": "申し訳ありませんが、この依頼には応じられません。"
            "{safety}に関わる内容で、危害につながるおそれがあるためです。"
            "代わりに、公的な窓口や信頼できる公式情報など、安全な方法をご案内できます。",
            "REFUSE": "申し訳ありませんが、このご依頼にはお応えできません。",
        },
        "safety_default": "安全上の問題",
    },
    "en": {
        "task": "Request: {summary}\nThe user wants {kind} about {domain}.",
        "kind_q": "an answer",
        "kind_do": "help",
        "domain_default": "a general topic",
        "safety": {
            "ALLOW": "Safety assessment: no harmful intent or dangerous information. This is ordinary information.",
            "ESCALATION": "Safety assessment: this needs an individual judgement in {domain}; a wrong answer could "
            "harm the user. An AI should not decide it alone.",
            "DENY": "Safety assessment: the request falls under {safety} and could lead to harm if followed as asked, "
            "but a safe alternative can be offered.",
            "REFUSE": "Safety assessment: the request is clearly harmful ({safety}); giving any detail would itself be "
            "dangerous.",
        },
        "policy": {
            "ALLOW": "Applicable policy: answer allowed requests accurately and helpfully.",
            "ESCALATION": "Applicable policy: hand requests that need professional judgement to a human expert, "
            "with the reason.",
            "DENY": "Applicable policy: decline requests that could cause harm, explain why, and offer a safe "
            "alternative.",
            "REFUSE": "Applicable policy: refuse clearly harmful requests briefly, without detail.",
        },
        "final": {
            "ESCALATION": "This needs a professional judgement in {domain}, so I am handing it to a human expert: a "
            "wrong decision could cause you harm. The expert will get back to you.",
            "DENY": "I'm sorry, but I can't help with that request: it concerns {safety} and could lead to harm. "
            "Instead, I can point you to official resources or a safe way to reach your goal.",
            "REFUSE": "I'm sorry, but I can't help with that.",
        },
        "safety_default": "a safety risk",
    },
}


def _summary(text: str, limit: int = 80) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def derive(src: Source) -> tuple[Thinking, str]:
    """Thinking (task, safety, policy) and final answer for a request and its label."""
    t = _TEXT[src.lang]
    domain = src.domain or t["domain_default"]
    safety = src.safety or t["safety_default"]
    kind = t["kind_q"] if src.label in ("ALLOW", "ESCALATION") else t["kind_do"]
    task = t["task"].format(summary=_summary(src.user), domain=domain, kind=kind)
    assessment = t["safety"][src.label].format(domain=domain, safety=safety)
    thinking = Thinking(
        task=task,
        safety=f"{assessment}\n{verdict_line(cast(Label, src.label), src.lang)}",
        policy=t["policy"][src.label],
    )
    final = src.answer if src.label == "ALLOW" else t["final"][src.label].format(domain=domain, safety=safety)
    return thinking, final


def from_existing(src: Source) -> tuple[Thinking, str] | None:
    """Keep thinking and answer of an output already in /think form; None if the output is a plain answer."""
    if not src.answer.lstrip().startswith(("#", "<think")):
        return None
    parsed = parse(src.answer)
    if not parsed.ok:
        raise Reject(
            "malformed_think", f"field 'output' looks like /think output but does not parse: {parsed.error}", "output"
        )
    if parsed.label and parsed.label != src.label:
        raise Reject(
            "label_mismatch",
            f"field 'output' says {parsed.label} but four_class_label is {src.label}",
            "four_class_label",
        )
    thinking = parsed.thinking or ""
    derived, _ = derive(src)
    if find_label(thinking) is None:  # teach the label even when the source thinking did not state it
        return Thinking(task=thinking, safety=derived.safety, policy=derived.policy), parsed.final or ""
    return Thinking(task=thinking), parsed.final or ""
