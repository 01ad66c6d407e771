"""The audit log: every request a row, rows hash-chained, any edit found at its row, no text in the file.

Requests go through the real HTTP server (uvicorn on 127.0.0.1) with the FIXED-OUTPUT backend (not a model).
"""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from services.cli import run_stage
from services.think_api import gate
from services.think_api.app import create_app, serve_background
from services.think_api.audit import FIELDS, GENESIS, AuditLog, AuditRecord, row_hash, rows, verify
from services.think_api.backends import FixedOutputBackend
from shared.think_format import LABELS, Thinking, render_assistant, verdict_line

N = 32


def _reply_for(prompt: str) -> str:
    """A /think reply whose thinking and answer carry markers derived from the request number in the prompt."""
    n = int(prompt.rsplit("request #", 1)[1].split("<|end|>", 1)[0])
    label = LABELS[n % 4]
    th = Thinking(
        f"THINKMARK-{n:04d}-task reasoning",
        f"THINKMARK-{n:04d}-safety\n{verdict_line(label, 'en')}",
        f"THINKMARK-{n:04d}-policy",
    )
    return render_assistant(th, f"ANSWERMARK-{n:04d}", "quadruple" if n % 2 else "simple")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """N concurrent requests (plus a few rejected ones) against a live server; yields (db path, responses)."""
    db = tmp_path_factory.mktemp("audit") / "audit.sqlite3"
    backend = FixedOutputBackend(_reply_for, delay_s=0.01)  # a little generation time, so requests overlap
    audit = AuditLog(db)
    with serve_background(create_app(backend, audit)) as url:
        with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(16) as pool:
            responses = list(
                pool.map(lambda i: client.post("/think", json={"prompt": f"PROMPTMARK request #{i}"}), range(N))
            )
            rejected = [
                client.post("/think", json={"prompt": "PROMPTMARK request #1", "max_tokens": 10**6}),
                client.post("/think", content=b"{broken"),
            ]
    audit.close()
    return db, responses, rejected


def test_n_concurrent_requests_make_n_rows_and_a_valid_chain(served):
    db, responses, rejected = served
    assert [r.status_code for r in rejected] == [422, 400]
    verdict = verify(db)
    assert verdict.ok and verdict.rows == N + 2
    got = rows(db)
    assert [r["seq"] for r in got] == list(range(1, N + 3))
    assert got[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["row_hash"] for a, b in zip(got, got[1:]))
    assert {r["request_id"] for r in got[:N]} == {r.json()["request_id"] for r in responses}
    assert [r["status"] for r in got[N:]] == ["rejected", "rejected"]
    by_id = {r["request_id"]: r for r in got}
    for resp in responses:
        body, row = resp.json(), by_id[resp.json()["request_id"]]
        n = int(resp.request.content.decode().rsplit("#", 1)[1].split('"')[0])
        thinking = Thinking(
            f"THINKMARK-{n:04d}-task reasoning",
            f"THINKMARK-{n:04d}-safety\n{verdict_line(LABELS[n % 4], 'en')}",
            f"THINKMARK-{n:04d}-policy",
        ).text()
        assert (row["label"], row["status"], row["http_status"]) == (body["safety_label"], body["status"], 200)
        assert row["thinking_sha256"] == body["internal_reasoning_hash"] == gate.sha256(thinking)
        assert row["answer_sha256"] == gate.sha256(body["answer"]) and row["answer_chars"] == len(body["answer"])
        assert row["thinking_chars"] == len(thinking) and row["prompt_chars"] == len(f"PROMPTMARK request #{n}")
        assert row["escalated"] == (body["safety_label"] == "ESCALATION")
        assert row["latency_ms"] >= row["backend_ms"] >= 10.0 * 0.9
        assert row["model"] == "fixed-output" and row["backend"] == "fixed-output"


def test_no_text_of_a_request_is_in_the_database_files(served):
    db, responses, _ = served
    blob = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith(db.name))
    assert len(blob) > 0 and b"THINKMARK" not in blob and "THINKMARK".encode("utf-16-le") not in blob
    assert b"PROMPTMARK" not in blob and b"ANSWERMARK" not in blob
    assert any("ANSWERMARK" in r.text for r in responses)  # the answers did go out, to the client only


def _edited_copy(db: Path, dest: Path, sql: str, params=()) -> Path:
    src = sqlite3.connect(db)
    out = sqlite3.connect(dest)
    src.backup(out)
    src.close()
    out.execute(sql, params)
    out.commit()
    out.close()
    return dest


@pytest.mark.parametrize("seq", [1, N // 2, N + 2])
def test_editing_any_column_of_any_row_fails_verify_at_that_row(served, tmp_path, seq):
    db, _, _ = served
    columns = [name for name, _ in FIELDS] + ["prev_hash", "row_hash"]
    for col in columns:
        copy = _edited_copy(
            db,
            tmp_path / f"{col}.sqlite3",
            f"UPDATE audit SET {col} = CASE WHEN typeof({col}) IN ('integer', 'real') THEN {col} + 1 "
            f"WHEN {col} IS NULL THEN 'x' ELSE {col} || 'x' END WHERE seq = ?",
            (seq,),
        )
        v = verify(copy)
        assert (v.ok, v.broken_seq) == (False, seq), col


def test_deleting_or_inserting_a_row_fails_verify_there(served, tmp_path):
    db, _, _ = served
    v = verify(_edited_copy(db, tmp_path / "del.sqlite3", "DELETE FROM audit WHERE seq = 5"))
    assert (v.ok, v.broken_seq) == (False, 6) and "missing" in v.reason
    v = verify(_edited_copy(db, tmp_path / "swap.sqlite3", "UPDATE audit SET seq = -seq WHERE seq IN (3, 4)"))
    assert not v.ok


def test_a_forged_row_needs_every_later_hash_rewritten(served, tmp_path):
    """Recomputing the edited row's own hash is not enough: the next row's link breaks."""
    db, _, _ = served
    # Flip the label to one it is not (rows are in arrival order, so seq 7's label varies from run to run).
    copy = _edited_copy(
        db,
        tmp_path / "forged.sqlite3",
        "UPDATE audit SET label = CASE WHEN label = 'ALLOW' THEN 'DENY' ELSE 'ALLOW' END WHERE seq = 7",
    )
    r = rows(copy)[6]
    assert r["label"] != rows(db)[6]["label"]
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE audit SET row_hash = ? WHERE seq = 7", (row_hash(r["prev_hash"], r),))
    conn.commit()
    conn.close()
    v = verify(copy)
    assert (v.ok, v.broken_seq) == (False, 8) and "prev_hash" in v.reason


def test_audit_verify_cli(served, tmp_path, capsys):
    db, _, _ = served
    assert run_stage("services.think_api.audit.cli", ["verify", "--db", str(db)]) == 0
    assert f"OK, {N + 2} rows, chain intact" in capsys.readouterr().out
    copy = _edited_copy(db, tmp_path / "e.sqlite3", "UPDATE audit SET latency_ms = 1 WHERE seq = 9")
    assert run_stage("services.think_api.audit.cli", ["verify", "--db", str(copy)]) == 1
    assert "BROKEN at row seq=9" in capsys.readouterr().out
    assert run_stage("services.think_api.audit.cli", ["verify", "--db", str(tmp_path / "none.sqlite3")]) == 2
    assert "audit database not found" in capsys.readouterr().err
    (tmp_path / "junk.sqlite3").write_bytes(b"not a database at all" * 100)
    assert run_stage("services.think_api.audit.cli", ["verify", "--db", str(tmp_path / "junk.sqlite3")]) == 2


def test_default_path_is_under_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    log = AuditLog()
    log.append(
        AuditRecord(
            request_id="r",
            model="m",
            backend="b",
            status="answered",
            http_status=200,
            escalated=False,
            latency_ms=1.5,
        )
    )
    log.close()
    assert (tmp_path / "audit" / "think_audit.sqlite3").is_file()
    assert run_stage("services.think_api.audit.cli", ["verify"]) == 0


def test_two_writers_on_one_file_keep_one_chain(tmp_path):
    """Two connections (as two server processes would have) appending at once still make one valid chain."""
    db = tmp_path / "shared.sqlite3"
    logs = [AuditLog(db), AuditLog(db)]

    def write(k: int) -> None:
        for i in range(40):
            logs[k].append(
                AuditRecord(
                    request_id=f"{k}-{i}",
                    model="m",
                    backend="b",
                    status="answered",
                    http_status=200,
                    escalated=0,
                    latency_ms=i,
                )
            )

    threads = [threading.Thread(target=write, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    v = verify(db)
    assert v.ok and v.rows == 80
    with pytest.raises(ValueError, match="unknown audit fields"):
        AuditLog(db).append(AuditRecord(prompt="never stored"))
