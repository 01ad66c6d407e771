"""The audit log: every request a row, rows chained under the server secret, any edit found at its row, a re-chained
or truncated log found against the head anchor, no text in the file, the files private to the server.

Requests go through the real HTTP server (uvicorn on 127.0.0.1) with the FIXED-OUTPUT backend (not a model).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import stat
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.cli import run_stage
from services.think_api.app import create_app, serve_background
from services.think_api.audit import FIELDS, GENESIS, NAMES, AuditLog, AuditRecord, row_hash, rows, verify
from services.think_api.backends import FixedOutputBackend
from services.think_api.secret import ServerSecret
from services.think_api.secret import default_path as secret_default_path
from shared.errors import InputError
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


@dataclass(frozen=True)
class Served:
    db: Path
    responses: list[httpx.Response]
    rejected: list[httpx.Response]
    secret: ServerSecret
    anchor: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """N concurrent requests (plus a few rejected ones) against a live server, its log keyed and anchored."""
    db = tmp_path_factory.mktemp("audit") / "audit.sqlite3"
    anchor = tmp_path_factory.mktemp("anchor") / "audit.anchor"
    secret = ServerSecret.load(tmp_path_factory.mktemp("secret") / "server.secret")
    backend = FixedOutputBackend(_reply_for, delay_s=0.01)  # a little generation time, so requests overlap
    audit = AuditLog(db, secret, anchor=anchor)
    with serve_background(create_app(backend, audit)) as url:
        with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(16) as pool:
            responses = list(
                pool.map(lambda i: client.post("/think", json={"prompt": f"PROMPTMARK request #{i}"}), range(N))
            )
            rejected = [
                client.post("/think", json={"prompt": "PROMPTMARK request #1", "max_tokens": 10**6}),
                client.post("/think", content=b"{broken", headers={"Content-Type": "application/json"}),
                client.post("/think", content=b"{broken", headers={"Content-Type": "application/json"}),
            ]
    audit.close()
    return Served(db, responses, rejected, secret, anchor)


def test_n_concurrent_requests_make_n_rows_and_a_valid_chain(served):
    db, responses, rejected = served.db, served.responses, served.rejected
    assert [r.status_code for r in rejected] == [422, 400, 400]
    verdict = verify(db, served.secret, served.anchor)
    assert verdict.ok and verdict.rows == N + 2 and verdict.anchored
    got = rows(db)
    assert [r["seq"] for r in got] == list(range(1, N + 3))
    assert got[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["row_hash"] for a, b in zip(got, got[1:]))
    assert {r["request_id"] for r in got[:N]} == {r.json()["request_id"] for r in responses}
    # the 422 (parsed, then over a limit) has its row; the two unparsable bodies one tally row, written at shutdown
    assert [(r["status"], r["error"], r["count"]) for r in got[N:]] == [
        ("rejected", "max_tokens_too_large", None),
        ("rejected", "invalid_json", 2),
    ]
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
        assert row["thinking_sha256"] == body["internal_reasoning_hash"] == served.secret.digest(thinking)
        assert body["internal_reasoning_hash"] != hashlib.sha256(thinking.encode()).hexdigest()
        assert row["answer_sha256"] == served.secret.digest(body["answer"])
        assert row["answer_chars"] == len(body["answer"])
        assert row["thinking_chars"] == len(thinking) and row["prompt_chars"] == len(f"PROMPTMARK request #{n}")
        assert row["escalated"] == (body["safety_label"] == "ESCALATION")
        assert row["latency_ms"] >= row["backend_ms"] >= 10.0 * 0.9
        assert row["model"] == "fixed-output" and row["backend"] == "fixed-output"


def test_no_text_of_a_request_is_in_the_database_files(served):
    db, responses = served.db, served.responses
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
    db = served.db
    columns = [name for name, _ in FIELDS] + ["prev_hash", "row_hash"]
    for col in columns:
        copy = _edited_copy(
            db,
            tmp_path / f"{col}.sqlite3",
            f"UPDATE audit SET {col} = CASE WHEN typeof({col}) IN ('integer', 'real') THEN {col} + 1 "
            f"WHEN {col} IS NULL THEN 'x' ELSE {col} || 'x' END WHERE seq = ?",
            (seq,),
        )
        v = verify(copy, served.secret)
        assert (v.ok, v.broken_seq) == (False, seq), col


def test_deleting_or_inserting_a_row_fails_verify_there(served, tmp_path):
    db = served.db
    v = verify(_edited_copy(db, tmp_path / "del.sqlite3", "DELETE FROM audit WHERE seq = 5"), served.secret)
    assert (v.ok, v.broken_seq) == (False, 6) and "missing" in v.reason
    v = verify(
        _edited_copy(db, tmp_path / "swap.sqlite3", "UPDATE audit SET seq = -seq WHERE seq IN (3, 4)"), served.secret
    )
    assert not v.ok


def test_a_forged_row_needs_every_later_hash_rewritten(served, tmp_path):
    """Recomputing the edited row's own hash is not enough: the next row's link breaks."""
    db = served.db
    # Flip the label to one it is not (rows are in arrival order, so seq 7's label varies from run to run).
    copy = _edited_copy(
        db,
        tmp_path / "forged.sqlite3",
        "UPDATE audit SET label = CASE WHEN label = 'ALLOW' THEN 'DENY' ELSE 'ALLOW' END WHERE seq = 7",
    )
    r = rows(copy)[6]
    assert r["label"] != rows(db)[6]["label"]
    conn = sqlite3.connect(copy)
    conn.execute("UPDATE audit SET row_hash = ? WHERE seq = 7", (row_hash(served.secret, r["prev_hash"], r),))
    conn.commit()
    conn.close()
    v = verify(copy, served.secret)
    assert (v.ok, v.broken_seq) == (False, 8) and "prev_hash" in v.reason


def _verify_cli(db: Path, served: Served, anchor: bool = True) -> int:
    args = ["verify", "--db", str(db), "--secret-file", served.secret.source]
    return run_stage("services.think_api.audit.cli", args + (["--anchor", str(served.anchor)] if anchor else []))


def test_audit_verify_cli(served, tmp_path, capsys):
    db = served.db
    assert _verify_cli(db, served) == 0
    assert f"OK, {N + 2} rows, chain intact under the secret; head matches the anchor" in capsys.readouterr().out
    copy = _edited_copy(db, tmp_path / "e.sqlite3", "UPDATE audit SET latency_ms = 1 WHERE seq = 9")
    assert _verify_cli(copy, served) == 1
    assert "BROKEN at row seq=9" in capsys.readouterr().out
    assert _verify_cli(tmp_path / "none.sqlite3", served) == 2
    assert "audit database not found" in capsys.readouterr().err
    (tmp_path / "junk.sqlite3").write_bytes(b"not a database at all" * 100)
    assert _verify_cli(tmp_path / "junk.sqlite3", served) == 2
    other = tmp_path / "other.secret"
    other.write_text("ab" * 32)
    assert run_stage("services.think_api.audit.cli", ["verify", "--db", str(db), "--secret-file", str(other)]) == 1


def _rechain(db: Path, dest: Path, sql: str, rehash) -> Path:
    """A copy edited by `sql`, then every row's seq, prev_hash and row_hash recomputed with `rehash(prev, row)`."""
    copy = _edited_copy(db, dest, sql)
    conn = sqlite3.connect(copy)
    conn.row_factory = sqlite3.Row
    prev = GENESIS
    for i, r in enumerate([dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")], start=1):
        h = rehash(prev, r)
        conn.execute("UPDATE audit SET seq = ?, prev_hash = ?, row_hash = ? WHERE seq = ?", (i, prev, h, r["seq"]))
        prev = h
    conn.commit()
    conn.close()
    return copy


def _unkeyed(prev: str, r: dict) -> str:
    """The chain's hash before it was keyed: what anyone could recompute."""
    body = json.dumps({k: r.get(k) for k in NAMES if r.get(k) is not None}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()


def test_a_row_deleted_and_the_log_re_chained_without_the_key_fails_verify(served, tmp_path, capsys):
    db = served.db
    for name, rehash in (("unkeyed", _unkeyed), ("other-key", lambda p, r: row_hash(ServerSecret.ephemeral(), p, r))):
        copy = _rechain(db, tmp_path / f"{name}.sqlite3", "DELETE FROM audit WHERE seq = 5", rehash)
        assert verify(copy).ok  # links and order alone cannot tell: it needs the key
        v = verify(copy, served.secret)
        assert (v.ok, v.broken_seq) == (False, 1) and "under this secret" in v.reason, name
        assert _verify_cli(copy, served) == 1
        assert "BROKEN at row seq=1" in capsys.readouterr().out


def test_the_newest_rows_dropped_fail_verify_against_the_anchor(served, tmp_path, capsys):
    copy = _edited_copy(served.db, tmp_path / "cut.sqlite3", f"DELETE FROM audit WHERE seq > {N - 3}")
    assert verify(copy, served.secret).ok  # a clean prefix of the chain: only the anchor tells
    v = verify(copy, served.secret, served.anchor)
    assert not v.ok and "truncated" in v.reason and v.rows == N - 3
    assert _verify_cli(copy, served) == 1
    assert "rows were dropped (truncated)" in capsys.readouterr().out
    forged = tmp_path / "forged.anchor"
    anchor = json.loads(served.anchor.read_text())
    forged.write_text(json.dumps({**anchor, "seq": N - 3, "row_hash": rows(copy)[-1]["row_hash"]}))
    v = verify(copy, served.secret, forged)
    assert not v.ok and "MAC" in v.reason  # an anchor rewritten without the key


def test_the_anchor_lives_outside_the_databases_directory(tmp_path):
    with pytest.raises(InputError, match="outside the audit database's directory"):
        AuditLog(tmp_path / "a" / "audit.sqlite3", anchor=tmp_path / "a" / "head.anchor")


def test_the_audit_files_are_private(served):
    assert stat.S_IMODE(served.db.parent.stat().st_mode) == 0o700
    for p in served.db.parent.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(Path(served.secret.source).stat().st_mode) == 0o600


def _record(i: int) -> AuditRecord:
    return AuditRecord(
        request_id=f"r{i}", model="m", backend="b", status="answered", http_status=200, escalated=False, latency_ms=1.0
    )


def test_verify_reads_one_row_at_a_time(tmp_path):
    """The peak memory of verify does not grow with the log (the old verify loaded every row)."""
    peaks = []
    for n in (200, 4000):
        log = AuditLog(tmp_path / f"{n}.sqlite3")
        log._conn.execute("PRAGMA synchronous = OFF")  # a quick fill: durability is not what is tested here
        for i in range(n):
            log.append(_record(i))
        log.close()
        tracemalloc.start()
        v = verify(tmp_path / f"{n}.sqlite3", log.secret)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert v.ok and v.rows == n
    assert peaks[1] < 1.5 * peaks[0] + 64 * 1024, peaks


def test_default_paths_audit_under_data_dir_secret_outside(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SO8T_SECRET_FILE", str(tmp_path / "config" / "server.secret"))
    assert run_stage("services.think_api.audit.cli", ["verify"]) == 2  # no secret yet: nothing to check with
    assert "server secret not found" in capsys.readouterr().err
    log = AuditLog(secret=ServerSecret.load(secret_default_path()))
    log.append(_record(1))
    log.close()
    assert (tmp_path / "data" / "audit" / "think_audit.sqlite3").is_file()
    assert run_stage("services.think_api.audit.cli", ["verify"]) == 0
    with pytest.raises(InputError, match="outside the data volume"):
        ServerSecret.load(tmp_path / "data" / "server.secret")


def test_two_writers_on_one_file_keep_one_chain(tmp_path):
    """Two connections (as two server processes would have) appending at once still make one valid chain."""
    db = tmp_path / "shared.sqlite3"
    secret = ServerSecret.ephemeral()
    logs = [AuditLog(db, secret), AuditLog(db, secret)]

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
    v = verify(db, secret)
    assert v.ok and v.rows == 80
    with pytest.raises(ValueError, match="unknown audit fields"):
        AuditLog(db, secret).append(AuditRecord(prompt="never stored"))
