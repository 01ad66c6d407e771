"""The stacks with llama.cpp's `llama-server` as the engine and the think API in front (`--backend openai`), checked
by the real Docker Compose binary: the CPU stack (docker/compose.cpu.yaml) and the GPU opt-in
(docker/compose.llama-server.yaml): the engine on the profile's GGUF under the name the API asks for, loopback or
compose network only, the API's generations bounded by the engine's slots."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from test_compose import REPO, compose_bin, empty_env_file, wrapper_args  # noqa: F401 - fixtures

from services.stack.cli import serve_job


def render(compose_bin: Path, env_file: Path, *files: str, profiles: tuple[str, ...] = ()) -> dict:  # noqa: F811
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    cmd = [str(compose_bin), "--project-directory", str(REPO), "--env-file", str(env_file)]
    for f in ("compose.yaml", *files):
        cmd += ["-f", str(REPO / f)]
    for p in profiles:
        cmd += ["--profile", p]
    r = subprocess.run([*cmd, "config", "--format", "json"], capture_output=True, text=True, env=clean, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["services"]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_stack_serves_through_llama_server(compose_bin, empty_env_file, monkeypatch):  # noqa: F811
    services = render(compose_bin, empty_env_file, "docker/compose.cpu.yaml", profiles=("pipeline",))
    engine, api = services["llama-server"], services["think-api"]
    eargs, aargs = wrapper_args(engine), wrapper_args(api)
    assert (eargs.serve, aargs.serve) == ("llama-server", "openai")
    ecmd, acmd = list(engine["command"]), list(api["command"])
    assert option(ecmd, "--host") == "127.0.0.1" and engine["network_mode"] == "host"  # loopback only
    assert option(acmd, "--upstream") == f"http://127.0.0.1:{option(ecmd, '--port')}/v1"
    assert option(acmd, "--parallel") == option(ecmd, "--parallel") == "4"  # one generation per slot
    assert engine["image"] == services["converter"]["image"]  # llama-server is built into the converter image
    assert all(v.get("read_only") for v in engine["volumes"])
    monkeypatch.setenv("DATA_DIR", "/data")
    job, _ = serve_job(REPO / "configs" / "pipeline" / "tiny.yaml", "llama-server", [])
    api_job, _ = serve_job(REPO / "configs" / "pipeline" / "tiny.yaml", "openai", [])
    alias = option(job.commands[0], "--alias")
    assert option(api_job.commands[0], "--model") == alias and [u.name for u in job.upstreams] == ["convert"]


def test_gpu_llama_server_override(compose_bin, empty_env_file):  # noqa: F811
    services = render(compose_bin, empty_env_file, "docker/compose.llama-server.yaml")
    engine, api = services["llama-server"], services["think-api"]
    device = engine["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert not engine.get("ports")  # reached only through the think API
    assert wrapper_args(api).serve == "openai" and option(list(api["command"]), "--upstream").startswith(
        "http://llama-server:8080/"
    )
    assert api["depends_on"] == {"llama-server": {"condition": "service_healthy", "required": True}}
    job, _ = serve_job(REPO / "configs" / "pipeline" / "full.yaml", "openai", [])
    assert option(list(engine["command"]), "--alias") == option(job.commands[0], "--model")
    assert option(list(engine["command"]), "--model").endswith("/" + option(job.commands[0], "--model"))
