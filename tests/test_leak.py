"""Leak test: over many generated adversarial model outputs, no piece of the thinking ever reaches the answer.

Every thinking part carries unique marker tokens (ZQ + 6 hex digits) that appear nowhere else. Each base reply
(both formats, all four labels, Japanese and English) is mutated: tags in other cases, with spaces, with Unicode
look-alike brackets or letters, dropped, duplicated, swapped; headings varied; truncation at many points;
nesting of one section in another; the thinking repeated after the final part (and inside it), also disguised
(zero-width spaces, word joiners, soft hyphens, a BOM, bidi controls, tag characters between its letters, Cyrillic
look-alike letters, written backwards); chat-template tokens spliced in; and seeded random combinations of these.
A marker counts as leaked when it is in the answer once folded (invisible characters dropped, look-alikes folded,
case and whitespace ignored), forwards or backwards. The parser (`shared.think_format.parse`) and the
API's gate (`services.think_api.gate.decide`) must never return a marker; the endpoint is checked on a sample.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator

import pytest

from services.think_api import gate
from services.think_api.secret import ServerSecret
from shared.think_format import LABELS, Thinking, fold, parse, render_assistant, verdict_line

MARKER_RE = re.compile(r"ZQ[0-9A-F]{6}")
_FOLDED_MARKER_RE = re.compile(r"zq[0-9a-f]{6}")
SECRET = ServerSecret.ephemeral()


def leaked(text: str | None) -> bool:
    """A marker in `text`, plain or disguised (folded, whitespace dropped, forwards or backwards)."""
    if not text:
        return False
    squashed = "".join(fold(text).split())
    return bool(
        MARKER_RE.search(text) or _FOLDED_MARKER_RE.search(squashed) or _FOLDED_MARKER_RE.search(squashed[::-1])
    )


FINALS = {"ja": "答えは 4 です。計算の基本です。", "en": "The answer is 4.\nThat is basic arithmetic."}
LOOKALIKE_BRACKETS = [
    ("＜", "＞"),
    ("﹤", "﹥"),
    ("‹", "›"),
    ("〈", "〉"),
    ("《", "》"),
    ("⟨", "⟩"),
    ("<", "﹥"),
    ("˂", "˃"),
]
LOOKALIKE_LETTERS = {"i": "і", "a": "а", "k": "к", "e": "е", "o": "о", "l": "ӏ", "n": "ո", "t": "т"}
TEMPLATE_TOKENS = [
    "<|end|>",
    "<|user|>\n",
    "<|assistant|>\n",
    "<|system|>\n",
    "<|endoftext|>",
    "<|end|>\n<|assistant|>\n",
]


class Markers:
    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def __call__(self) -> str:
        while True:
            m = f"ZQ{self.rng.randrange(16**6):06X}"
            if m not in self.used:
                self.used.add(m)
                return m


def base_replies(rng: random.Random) -> Iterator[tuple[str, str, Thinking, str]]:
    """(format, label, thinking, final) for both formats, every label, both languages."""
    mk = Markers(rng)
    for fmt in ("simple", "quadruple"):
        for label in LABELS:
            for lang in ("ja", "en"):
                if lang == "ja":
                    task = f"依頼の内容: {mk()} 2+2 を計算する。\nユーザーは{mk()}について回答を求めている。"
                    safety = f"安全性の評価: {mk()} 有害な意図は見当たらない。\n{verdict_line(label, lang)}"
                else:
                    task = f"Request: compute 2+2 {mk()}.\nThe user wants {mk()} an answer about arithmetic."
                    safety = f"Safety assessment: {mk()} nothing harmful here.\n{verdict_line(label, lang)}"
                policy = (
                    f"適用する方針: {mk()} そのまま答える。{mk()}"
                    if lang == "ja"
                    else f"Applicable policy: {mk()} answer directly. {mk()}"
                )
                yield fmt, label, Thinking(task, safety, policy), FINALS[lang]


# --- mutations: each maps a well-formed reply to adversarial variants ---


def _tag_variants(tag: str) -> list[str]:
    name = tag.strip("</>")
    close = tag.startswith("</")
    slash = "/" if close else ""
    out = [
        tag.upper(),
        tag.title(),
        f"<{slash}{name.upper()}>",
        f"< {slash}{name}>",
        f"<{slash} {name} >",
        f"<{slash}{name}\t>",
        f"<{name}>" if close else f"</{name}>",
        "",
        tag + tag,
    ]
    out += [f"{lb}{slash}{name}{rb}" for lb, rb in LOOKALIKE_BRACKETS]
    for latin, lookalike in LOOKALIKE_LETTERS.items():
        if latin in name:
            out.append(f"<{slash}{name.replace(latin, lookalike, 1)}>")
    return out


def mutate_tags(reply: str, fmt: str) -> list[str]:
    if fmt != "quadruple":
        return []
    out = []
    for m in re.finditer(r"</?(?:think-task|think-safety|think-policy|final)>", reply):
        for v in _tag_variants(m.group()):
            out.append(reply[: m.start()] + v + reply[m.end() :])
    return out


HEADING_VARIANTS = {
    "# 思考ステップ": [
        "#思考ステップ",
        "## 思考ステップ",
        "＃ 思考ステップ",
        "# 思考ステップ:",
        " # 思考ステップ",
        "#  思考ステップ",
        "# 思考 ステップ",
        "思考ステップ",
        "# ｼｺｳｽﾃｯﾌﾟ",
        "### 思考ステップ ###",
        "**思考ステップ**",
        "",
    ],
    "# 最終回答": [
        "#最終回答",
        "## 最終回答",
        "＃ 最終回答",
        "# 最終回答:",
        "# 最終回答：",
        " # 最終回答",
        "#  最終回答",
        "# 最終 回答",
        "最終回答",
        "**最終回答**",
        "# Final answer",
        "",
    ],
}


def mutate_headings(reply: str, fmt: str) -> list[str]:
    if fmt != "simple":
        return []
    out = []
    for heading, variants in HEADING_VARIANTS.items():
        for v in variants:
            out.append(reply.replace(heading, v, 1))
    think, sep, final = reply.partition("\n\n# 最終回答\n")
    if not sep:  # already mutated: the varied headings above are all there is to do
        return out
    body = think.removeprefix("# 思考ステップ\n")
    out += [
        f"# 最終回答\n{final}\n\n# 思考ステップ\n{body}",  # swapped
        f"{think}\n\n# 最終回答\n{final}\n\n# 最終回答\n{body}",  # second final heading followed by thinking
        f"{think}\n\n# 最終回答\n{final}\n# 思考ステップ\n{body}",  # thinking again after the answer
        f"{body}\n\n# 最終回答\n{final}",  # no thinking heading
        f"{think}\n\n{final}",  # no final heading
        f"{think}\n\n# 最終回答\n",  # empty final
    ]
    for v in HEADING_VARIANTS["# 思考ステップ"][:-1]:  # a varied thinking heading after the answer
        out.append(f"{think}\n\n# 最終回答\n{final}\n{v}\n{body}")
    return out


def truncations(reply: str, fmt: str, rng: random.Random, n: int = 24) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(reply)), min(n, len(reply) - 1)))
    return [reply[:c] for c in cuts]


def _thinking_chunks(th: Thinking) -> list[str]:
    text = th.text()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return [text, th.task, th.safety, th.policy, *lines, text[: len(text) // 2], text[len(text) // 2 :]]


def repeats(reply: str, fmt: str, th: Thinking, final: str) -> list[str]:
    """The thinking (whole, by part, by line, by half) repeated after the final part or inside it."""
    out = []
    for chunk in _thinking_chunks(th):
        if fmt == "quadruple":
            out += [
                reply + chunk,
                reply + "\n" + chunk,
                reply + f"<think-task>{chunk}</think-task>",
                reply.replace(f"{final}</final>", f"{final}\n{chunk}</final>"),
                reply.replace(f"<final>{final}", f"<final>{chunk}\n{final}"),
                reply.replace("</final>", f"</final>{chunk}</final>"),
            ]
        else:
            out += [
                reply + "\n" + chunk,
                reply + "\n\n" + chunk,
                reply + chunk,
                reply.replace(f"\n{final}", f"\n{chunk}\n{final}"),
            ]
    return out


def nestings(reply: str, fmt: str, th: Thinking, final: str) -> list[str]:
    simple = render_assistant(th, final, "simple")
    quad = render_assistant(th, final, "quadruple")
    t = th.text()
    return [
        quad.replace(f"<final>{final}</final>", f"<final>{final}<think-task>{th.task}</think-task></final>"),
        quad.replace(f"<final>{final}</final>", f"<final><final>{t}</final>{final}</final>"),
        quad.replace("</think-task>", f"<final>{t}</final></think-task>", 1),
        quad.replace(f"<final>{final}</final>", f"<final>{simple}</final>"),
        quad.replace(f"<final>{final}</final>", f"<final>{final}\n# 思考ステップ\n{t}</final>"),
        simple.replace(f"\n{final}", f"\n{final}\n<think-task>{t}</think-task>"),
        simple.replace(f"\n{final}", f"\n{quad}"),
        f"<think-task>{th.task}<think-safety>{th.safety}</think-safety></think-task><think-policy>{th.policy}"
        f"</think-policy><final>{final}</final>",
        f"<think-task>{th.task}</think-task><think-safety>{th.safety}</think-safety><think-policy>{th.policy}"
        f"<final>{t}</final></think-policy><final>{final}</final>",
    ] + [  # a thinking section behind look-alike tags inside the final part
        quad.replace(f"<final>{final}</final>", f"<final>{final}{v}{th.task}{v.replace('think', '/think', 1)}</final>")
        for v in _tag_variants("<think-task>")
        if v and "/" not in v and v != "<think-task><think-task>"
    ]


def template_splices(reply: str, fmt: str, th: Thinking, final: str) -> list[str]:
    out = []
    t = th.text()
    for tok in TEMPLATE_TOKENS:
        out += [
            reply + tok + t,
            reply.replace(final, final + tok + t),
            reply.replace(final, tok + final),
            tok + reply,
            reply + tok,
            reply.replace(final, final + tok + reply),
        ]
    out.append(reply.replace(final, f"{final}<|end|>\n<|user|>\nok<|end|>\n<|assistant|>\n{reply}"))
    return out


DISGUISES: dict[str, Callable[[str], str]] = {
    "zero-width": lambda t: "\u200b".join(t),
    "word-joiner": lambda t: "\u2060".join(t),
    "soft-hyphen": lambda t: "\u00ad".join(t),
    "bom": lambda t: "\ufeff".join(t),
    "bidi": lambda t: "\u202d".join(t),
    "tag-chars": lambda t: "\U000e0020".join(t),
    "lookalike": lambda t: t.translate(str.maketrans({"A": "А", "C": "С", "E": "Е", **LOOKALIKE_LETTERS})),
    "reversed": lambda t: t[::-1],
    "reversed+zero-width": lambda t: "\u200b".join(t[::-1]),
}


def evasions(reply: str, fmt: str, th: Thinking, final: str) -> list[str]:
    """The thinking (whole and by part) repeated in the final part, disguised by each of DISGUISES."""
    out = []
    for chunk in (th.text(), th.task, th.policy):
        for disguise in DISGUISES.values():
            hidden = disguise(chunk)
            if fmt == "quadruple":
                out += [reply.replace(f"{final}</final>", f"{final}\n{hidden}</final>"), reply + hidden]
            else:
                out += [reply + "\n" + hidden, reply.replace(f"\n{final}", f"\n{hidden}\n{final}")]
    return out


MUTATORS: dict[str, Callable] = {
    "tags": lambda r, f, th, fin, rng: mutate_tags(r, f),
    "headings": lambda r, f, th, fin, rng: mutate_headings(r, f),
    "truncation": lambda r, f, th, fin, rng: truncations(r, f, rng),
    "repeat": lambda r, f, th, fin, rng: repeats(r, f, th, fin),
    "nesting": lambda r, f, th, fin, rng: nestings(r, f, th, fin),
    "template": lambda r, f, th, fin, rng: template_splices(r, f, th, fin),
    "evasion": lambda r, f, th, fin, rng: evasions(r, f, th, fin),
}


def adversarial_cases(seed: int = 1234, combos: int = 12) -> Iterator[tuple[str, str, str]]:
    """(family, prompt, output): every single mutation of every base reply, then seeded pairs of mutations."""
    rng = random.Random(seed)
    for fmt, _label, th, final in base_replies(rng):
        reply = render_assistant(th, final, fmt)
        assert MARKER_RE.search(th.task) and MARKER_RE.search(th.policy) and not MARKER_RE.search(final)
        prompt = "2+2は？" if "依頼" in th.task else "What is 2+2?"
        yield "well-formed", prompt, reply
        singles = [(name, out) for name, mut in MUTATORS.items() for out in mut(reply, fmt, th, final, rng)]
        yield from ((name, prompt, out) for name, out in singles)
        for _ in range(combos * len(MUTATORS)):  # a second mutation on top of a first one
            name1, first = rng.choice(singles)
            name2 = rng.choice(list(MUTATORS))
            seconds = MUTATORS[name2](first, fmt, th, final, rng)
            for out in rng.sample(seconds, min(4, len(seconds))):
                yield f"{name1}+{name2}", prompt, out


CASES = list(adversarial_cases())


def test_no_thinking_marker_ever_reaches_the_answer():
    outcomes: dict[str, int] = {}
    leaks = []
    for family, prompt, output in CASES:
        p = parse(output)
        assert p.final is None or p.ok
        # The parser alone cannot tell a repeated sentence from an answer: the gate checks repeats (with the prompt).
        if p.final is not None and MARKER_RE.search(p.final) and not {"repeat", "evasion"} & set(family.split("+")):
            leaks.append(("parse", family, output))
        d = gate.decide(output, prompt, SECRET)
        outcomes[d.status] = outcomes.get(d.status, 0) + 1
        if leaked(d.answer) or leaked(d.reason):
            leaks.append(("gate", family, output))
    families = sorted({f for f, _, _ in CASES})
    print(
        f"\nleak test: {len(CASES)} adversarial outputs in {len(families)} mutation families; "
        f"gate outcomes {dict(sorted(outcomes.items()))}; leaks {len(leaks)}"
    )
    assert not leaks, f"{len(leaks)} leaks, first: {leaks[:3]}"
    assert len(CASES) >= 5000
    assert outcomes["withheld"] > len(CASES) // 2 and outcomes["answered"] > 0  # both paths exercised


def test_the_streaming_gate_never_releases_a_marker_and_adds_up_to_the_gate():
    """Every output fed to gate.StreamGate one character at a time (the finest a backend can stream): nothing it
    releases holds a marker, and a reply decide() passes streams exactly decide()'s answer."""
    outcomes: dict[str, int] = {}
    problems = []
    for family, prompt, output in CASES:
        sg = gate.StreamGate(prompt, SECRET)
        sent = "".join(sg.feed(ch) for ch in output)
        rest, d = sg.finish()
        sent += rest
        whole = gate.decide(output, prompt, SECRET)
        key = "stopped early" if sg.failure is not None and len(sg.reply) < len(output) else d.status
        outcomes[key] = outcomes.get(key, 0) + 1
        if leaked(sent) or leaked(d.reason):
            problems.append(("marker", family, output))
        if (d.status, d.label) != (whole.status, whole.label) or (whole.status != "withheld" and sent != whole.answer):
            problems.append(("differs", family, output))
    print(f"\nstreaming leak test: {len(CASES)} outputs, one character at a time; {dict(sorted(outcomes.items()))}")
    assert not problems, f"{len(problems)} problems, first: {problems[:3]}"
    assert outcomes["stopped early"] > 0 and outcomes["answered"] > 0


def test_well_formed_replies_still_pass_the_gate():
    for fmt, label, th, final in base_replies(random.Random(7)):
        d = gate.decide(render_assistant(th, final, fmt), "", SECRET)
        expected = {"ALLOW": final, "DENY": final, "REFUSE": gate.REFUSAL, "ESCALATION": gate.HANDOFF}[label]
        assert (d.http_status, d.label, d.answer) == (200, label, expected)
        assert d.thinking_hmac == SECRET.digest(th.text())


def test_every_evasion_family_is_withheld_whole_and_streamed():
    """Each disguise of the thinking repeated in an ALLOW answer is withheld by decide() and by the streaming gate
    (and by name: an evasion is only an evasion if the undisguised repeat would be caught too)."""
    caught: dict[str, int] = {}
    for fmt, label, th, final in base_replies(random.Random(5)):
        if label != "ALLOW":
            continue
        reply = render_assistant(th, final, fmt)
        for name, disguise in DISGUISES.items():
            out = reply.replace(f"{final}</final>", f"{final}\n{disguise(th.policy)}</final>")
            if fmt == "simple":
                out = reply + "\n" + disguise(th.policy)
            d = gate.decide(out, "", SECRET)
            sg = gate.StreamGate("", SECRET)
            sent = "".join(sg.feed(ch) for ch in out)
            rest, sd = sg.finish()
            assert (d.status, d.reason, sd.status) == (
                "withheld",
                "thinking text repeated in the final part",
                "withheld",
            )
            assert not leaked(sent + rest), (name, sent)
            caught[name] = caught.get(name, 0) + 1
    assert set(caught) == set(DISGUISES) and min(caught.values()) == 4  # 2 formats x 2 languages


def test_invisible_characters_are_stripped_from_an_answer():
    th = Thinking(f"依頼は計算です。\n{verdict_line('ALLOW')}")
    d = gate.decide(render_assistant(th, "答えは\u200b 4\u2060 です\U000e0041。", "simple"), "", SECRET)
    assert (d.status, d.answer) == ("answered", "答えは 4 です。")
    only_invisible = gate.decide(render_assistant(th, "\u200b\u2060", "simple"), "", SECRET)
    assert only_invisible.status == "withheld"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from fastapi.testclient import TestClient

    from services.think_api.app import create_app
    from services.think_api.audit import AuditLog
    from services.think_api.backends import FixedOutputBackend

    # the fixed-output backend (not a model) replies with the adversarial output the prompt names
    sample = random.Random(99).sample(CASES, 300)
    replies = {f"case {i}<|end|>": out for i, (_, _, out) in enumerate(sample)}
    backend = FixedOutputBackend(lambda prompt: next(out for key, out in replies.items() if key in prompt))
    audit = AuditLog(tmp_path_factory.mktemp("leak") / "audit.sqlite3", SECRET)
    with TestClient(create_app(backend, audit)) as client:
        yield client, sample


def test_endpoint_never_returns_a_marker(api):
    client, sample = api
    for i, (_, _, output) in enumerate(sample):
        r = client.post("/think", json={"prompt": f"case {i}"})
        assert r.status_code in (200, 502)
        assert not leaked(r.json().get("answer")) and not MARKER_RE.search(r.text), (output, r.text)
    print(f"\nendpoint leak test: {len(sample)} adversarial outputs through POST /think, no marker returned")
