"""Dataset builder: accounting, rejects with line numbers, determinism, skip-by-manifest, no partial outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.dataset.build import DatasetOptions, InputError, build
from services.dataset.records import parse_line
from services.dataset.thinking import derive
from shared.think_format import parse

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = str(REPO / "examples" / "four_class" / "*.jsonl")
BROKEN = REPO / "tests" / "data" / "four_class_broken.jsonl"
# line -> reason of every bad line in the broken file (line 9 duplicates line 1, line 1 is good)
EXPECTED_REJECTS = {
    2: "invalid_json",
    3: "missing_field",
    4: "unknown_label",
    5: "empty_text",
    6: "wrong_type",
    7: "invalid_utf8",
    8: "not_an_object",
    10: "missing_field",
    11: "wrong_type",
    12: "format_marker_in_text",
}


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]


def test_examples_build_all_labels_both_languages(tmp_path):
    res = build([EXAMPLES], tmp_path / "ds", DatasetOptions())
    m = res.metrics
    assert m["rejected"] == 0 and m["read"] == m["written"] + m["duplicates"]
    assert set(m["per_label"]) == {"ALLOW", "ESCALATION", "DENY", "REFUSE"}
    train, val = _lines(tmp_path / "ds" / "train.jsonl"), _lines(tmp_path / "ds" / "val.jsonl")
    assert len(train) + len(val) == m["written"] and len(val) >= 4  # at least one per label (stratified)
    assert {r["four_class_label"] for r in val} == {"ALLOW", "ESCALATION", "DENY", "REFUSE"}
    assert {r["lang"] for r in train} == {"ja", "en"}
    for r in train + val:
        parsed = parse(r["messages"][-1]["content"])
        assert parsed.ok and parsed.label == r["four_class_label"], r["source"]
        assert r["text"].endswith("<|end|>\n<|endoftext|>")
        assert ":" in r["source"]


def test_label_drives_the_final_answer():
    _, ok = parse_line(
        json.dumps(
            {
                "instruction": "爆弾の作り方",
                "output": "詳細な手順…",
                "four_class_label": "REFUSE",
                "safety_label": "explosives",
            }
        ).encode()
    )
    thinking, final = derive(ok)
    assert "手順" not in final and "お応えできません" in final  # a refusal carries no detail
    assert "判定: REFUSE" in thinking.safety
    _, esc = parse_line(
        json.dumps(
            {"instruction": "Can I double my dose?", "four_class_label": "ESCALATION", "domain_label": "medical"}
        ).encode()
    )
    thinking, final = derive(esc)
    assert esc.lang == "en" and "human expert" in final and "Verdict: ESCALATION" in thinking.safety


def test_existing_think_output_is_kept(tmp_path):
    res = build([EXAMPLES], tmp_path / "ds", DatasetOptions())
    rows = _lines(tmp_path / "ds" / "train.jsonl") + _lines(tmp_path / "ds" / "val.jsonl")
    rainbow = next(r for r in rows if "虹" in r["messages"][1]["content"])
    assert "波長ごとに曲がり方が違う" in rainbow["messages"][-1]["content"]
    assert res.metrics["written"] == 60


def test_broken_lines_are_rejected_with_line_and_reason(tmp_path):
    res = build([str(BROKEN)], tmp_path / "ds", DatasetOptions())
    rejects = _lines(tmp_path / "ds" / "rejects.jsonl")
    assert {r["line"]: r["reason"] for r in rejects} == EXPECTED_REJECTS
    assert all(r["file"] == str(BROKEN) and r["raw"] and r["message"] for r in rejects)
    m = res.metrics
    assert (m["read"], m["written"], m["duplicates"], m["rejected"]) == (12, 1, 1, 10)
    assert m["read"] == m["written"] + m["duplicates"] + m["rejected"]
    assert m["per_reason"]["missing_field"] == 2
    assert "\\xff" in next(r for r in rejects if r["reason"] == "invalid_utf8")["raw"]


def test_same_inputs_same_bytes_and_second_run_skips(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build([EXAMPLES], a, DatasetOptions(seed=7))
    build([EXAMPLES], b, DatasetOptions(seed=7))
    for name in ("train.jsonl", "val.jsonl", "rejects.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert build([EXAMPLES], a, DatasetOptions(seed=7)).skipped
    assert not build([EXAMPLES], a, DatasetOptions(seed=8)).skipped  # another seed is another dataset
    c = tmp_path / "c"
    build([EXAMPLES], c, DatasetOptions(seed=8))
    assert (a / "val.jsonl").read_bytes() == (c / "val.jsonl").read_bytes()


def test_changed_input_rebuilds(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(Path(REPO / "examples/four_class/safety_en.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "ds"
    build([str(src)], out, DatasetOptions())
    with open(src, "a", encoding="utf-8") as fh:
        fh.write(
            json.dumps({"instruction": "New question?", "output": "New answer.", "four_class_label": "ALLOW"}) + "\n"
        )
    res = build([str(src)], out, DatasetOptions())
    assert not res.skipped and res.metrics["written"] == 23


def test_failure_leaves_previous_dataset_untouched(tmp_path):
    out = tmp_path / "ds"
    build([EXAMPLES], out, DatasetOptions())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'not json\n{"four_class_label": "ALLOW"}\n')
    with pytest.raises(InputError, match="no usable record"):
        build([str(bad)], out, DatasetOptions())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind


def test_duplicates_are_counted_not_written(tmp_path):
    src = tmp_path / "dup.jsonl"
    line = json.dumps({"instruction": "Q?", "output": "A.", "four_class_label": "ALLOW"})
    src.write_text("\n".join([line] * 5) + "\n\n", encoding="utf-8")
    m = build([str(src)], tmp_path / "ds", DatasetOptions()).metrics
    assert (m["read"], m["written"], m["duplicates"]) == (5, 1, 4)


def test_quality_filter_sends_low_scores_to_rejects(tmp_path):
    res = build([EXAMPLES], tmp_path / "ds", DatasetOptions(min_quality=0.5))
    m = res.metrics
    assert m["quality"]["filter"] == 0.5 and m["quality"]["filtered"] > 0
    assert m["read"] == m["written"] + m["duplicates"] + m["rejected"]
    assert m["per_reason"].get("low_quality", 0) == m["quality"]["filtered"]
    assert all(r["quality"] >= 0.5 for r in _lines(tmp_path / "ds" / "train.jsonl"))


def _cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "services.dataset", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_reports_rejects_and_missing_input(tmp_path):
    r = _cli("--input", str(BROKEN), "--output", str(tmp_path / "ds"))
    assert r.returncode == 0, r.stderr
    assert f"{BROKEN}:7: invalid_utf8" in r.stdout and f"{BROKEN}:4: unknown_label" in r.stdout
    r = _cli("--input", str(tmp_path / "nothing-*.jsonl"), "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "matches no file" in r.stderr
    assert not (tmp_path / "x").exists()
