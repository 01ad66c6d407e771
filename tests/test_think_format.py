"""The /think format: round trips, Phi-3.5 template equality, and the parser's totality."""

import pytest

from shared.think_format import (
    FORMATS,
    PHI35_CHAT_TEMPLATE,
    Thinking,
    parse,
    render_assistant,
    render_chat,
    system_prompt,
    verdict_line,
)

THINKING = Thinking(
    task="依頼の内容: 2+2 を計算する。\n# これは見出しではなく本文の行\n## 小見出し",
    safety=f"安全性の評価: 問題なし。\n{verdict_line('ALLOW')}",
    policy="適用する方針: そのまま答える。",
)
FINAL = "答えは 4 です。\n# 補足: 四則演算の基本です"


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_japanese_with_hash_lines(fmt):
    out = parse(render_assistant(THINKING, FINAL, fmt))
    assert out.ok, out.error
    assert out.format == fmt
    assert out.final == FINAL
    assert out.label == "ALLOW"
    assert out.thinking == THINKING.text()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("label", ["ALLOW", "ESCALATION", "DENY", "REFUSE"])
def test_round_trip_english_labels(fmt, label):
    th = Thinking("The user asks something.", f"Assessment.\n{verdict_line(label, 'en')}", "Policy.")
    out = parse(render_assistant(th, "The answer.", fmt) + "<|end|>")
    assert (out.ok, out.label, out.final) == (True, label, "The answer.")


@pytest.mark.parametrize("bad", ["thinking <final>x</final>", "<|end|>", "# 最終回答"])
def test_renderer_refuses_parts_that_would_not_parse_back(bad):
    with pytest.raises(ValueError):
        render_assistant(Thinking(bad), "final", "simple")
    with pytest.raises(ValueError):
        render_assistant(Thinking("ok"), bad, "quadruple")


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        ("just an answer with no thinking", "no thinking section"),
        ("# 思考ステップ\nthinking only, truncated", "no final-answer heading"),
        ("# 思考ステップ\nA\n# 最終回答\nB\n# 最終回答\nC", "repeated"),
        ("# 思考ステップ\nA\n# 最終回答\nB\n# 思考ステップ\nleak", "thinking heading repeated"),
        ("<think-task>a</think-task><think-safety>b</think-safety><think-policy>c</think-policy><final>d", "unclosed"),
        (
            "<think-task>a</think-task><think-safety>b</think-safety><think-policy>c</think-policy><final>d</final>secret",
            "text after final",
        ),
        (
            "<think-task>a</think-task><think-safety>b</think-safety><think-policy>c</think-policy><FINAL>d</FINAL>",
            "case",
        ),
        (
            "<think-task>a</think-task><think-safety>b</think-safety><think-policy>c</think-policy><final>d<think-task>x"
            "</final>",
            "tag inside",
        ),
        (
            "<think-task>a</think-task><think-safety>b</think-safety><think-policy>c</think-policy>"
            "<final>d ＜/think-task＞ e</final>",
            "fullwidth look-alike",
        ),
        (
            "<think-task>a</think-task><think-safety>b</think-safety><think-policy>c</think-policy>"
            "<final>d<|user|>e</final>",
            "template token",
        ),
    ],
)
def test_malformed_output_never_yields_a_final(text, why):
    out = parse(text)
    assert not out.ok and out.final is None and out.thinking is None, why


def test_parser_is_total_on_junk():
    for junk in [None, 3, "<", "#", "<final></final>", "\x00\ufeff", "<think-task>" * 50]:
        out = parse(junk)
        assert out.final is None


def test_render_chat_matches_design_template():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    assert render_chat(msgs) == "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n<|endoftext|>"
    assert render_chat(msgs[:2], add_generation_prompt=True).endswith("<|user|>\nU<|end|>\n<|assistant|>\n")
    assert not render_chat([{"role": "system", "content": ""}, msgs[1]]).startswith("<|system|>")


def _conversations():
    for fmt in FORMATS:
        yield [
            {"role": "system", "content": system_prompt(fmt)},
            {"role": "user", "content": "2+2は？\n# 見出し"},
            {"role": "assistant", "content": render_assistant(THINKING, FINAL, fmt)},
        ]
    yield [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 2+2?"},
    ]


def test_render_chat_equals_our_tokenizer_template(tiny_tokenizer):
    assert tiny_tokenizer.chat_template == PHI35_CHAT_TEMPLATE
    for conv in _conversations():
        for gen in (False, True):
            assert render_chat(conv, gen) == tiny_tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=gen
            )


@pytest.mark.real_tokenizer
def test_render_chat_equals_real_phi35_template(real_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    for conv in _conversations():
        for gen in (False, True):
            assert render_chat(conv, gen) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
