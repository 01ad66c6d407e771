"""Shared library: typed config errors, atomic writes, manifests, the tiny model, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from shared import atomic, manifest
from shared.config import ConfigError, StrictModel, load_config

REPO = Path(__file__).resolve().parents[1]


class Inner(StrictModel):
    r: int = Field(8, gt=0)
    mode: Literal["a", "b"] = "a"


class Outer(StrictModel):
    name: str
    inner: Inner = Inner()


def test_config_errors_name_file_line_and_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ninner:\n  r: many\n  bogus: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(Outer, cfg)
    msg = str(err.value)
    assert f"{cfg}:3: inner.r:" in msg and "integer" in msg
    assert f"{cfg}:4: inner.bogus: unknown key" in msg


def test_config_overrides_and_digest(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    a = load_config(Outer, cfg)
    b = load_config(Outer, cfg, {"inner.r": 16, "inner.mode": None})
    assert (a.inner.r, b.inner.r) == (8, 16) and a.digest() != b.digest()
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as fh:
            fh.write('{"v": 2')
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_staging_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "out"
    with atomic.staging_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic.staging_dir(target) as d:
            (d / "a").write_text("2")
            raise RuntimeError
    assert (target / "a").read_text() == "1"
    # a crash between the two renames of a swap leaves .out.old: the next writer restores it
    os.replace(target, tmp_path / ".out.old")
    atomic.recover_dir(target)
    assert (target / "a").read_text() == "1"


def test_atomic_outputs_get_a_new_files_mode_not_the_temp_files_private_one(tmp_path):
    """mkstemp/mkdtemp make 0600/0700; an artifact the next stage reads (maybe as another user) must not be."""
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "m.json", "{}")
        with atomic.staging_dir(tmp_path / "run") as d:
            (d / "x").write_text("1")
        temp = atomic.temp_file(tmp_path / "w.gguf")
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
    assert temp.stat().st_mode & 0o777 == 0o644 and temp.name.startswith(".w.gguf.") and temp.suffix == ".tmp"
    assert atomic.remove_stale_temps(tmp_path) == [temp]


def test_manifest_up_to_date_tracks_inputs_and_config(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("a")
    inputs = {"in": manifest.describe_input(f)}
    manifest.write(tmp_path, manifest.build("s", inputs, {}, "h1", 0.0, {"m": 1}))
    assert manifest.is_up_to_date(tmp_path, "s", inputs, "h1")
    assert not manifest.is_up_to_date(tmp_path, "s", inputs, "h2")
    f.write_text("b")
    assert not manifest.is_up_to_date(tmp_path, "s", {"in": manifest.describe_input(f)}, "h1")
    assert manifest.read(tmp_path)["versions"]["torch"]


def test_tiny_model_is_phi3_with_real_special_ids(tiny_model_dir, tiny_tokenizer):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "phi3" and cfg["hidden_size"] % 256 == 0 and cfg["vocab_size"] == 32064
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
    assert rope["rope_type" if "rope_type" in rope else "type"] == "longrope"
    assert len(rope["short_factor"]) == cfg["hidden_size"] // cfg["num_attention_heads"] // 2
    ids = {
        t: tiny_tokenizer.convert_tokens_to_ids(t)
        for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
    }
    assert ids == {
        "<|system|>": 32006,
        "<|user|>": 32010,
        "<|assistant|>": 32001,
        "<|end|>": 32007,
        "<|endoftext|>": 32000,
    }
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))
    assert sp.vocab_size() == 32000 and sp.id_to_piece(3) == "<0x00>"
    text = "思考ステップ 2+2 = 4"
    assert tiny_tokenizer.decode(tiny_tokenizer(text).input_ids) == text


def test_every_cli_command_has_help():
    from services.cli import COMMANDS

    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "services", "--help"], env=env, capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout, f"so8t {name} missing from --help"
        sub = subprocess.run(
            [sys.executable, "-m", "services", name, "--help"],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert sub.returncode == 0 and "usage:" in sub.stdout, (name, sub.stderr[-2000:])


def test_long_loops_log_progress_lines_without_a_bar(monkeypatch, caplog):
    """No terminal (a container's log): a loop longer than LOG_PROGRESS_EVERY logs a line that often and one at its
    end, a short loop nothing, and $SO8T_PROGRESS=0 silences both."""
    import time

    from shared import logs

    monkeypatch.setattr(logs, "LOG_PROGRESS_EVERY", 0.2)
    monkeypatch.delenv("SO8T_PROGRESS", raising=False)
    monkeypatch.setattr(logs, "bars", lambda: False)
    caplog.set_level("INFO", logger="so8t.progress")
    for _ in logs.progress(range(2), desc="short", unit="rec"):
        pass
    for _ in logs.progress(range(8), desc="long", unit="rec"):
        time.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "so8t.progress"]
    assert not any(line.startswith("short") for line in lines)
    assert 2 <= len(lines) <= 6 and lines[-1].startswith("long: 8/8 ["), lines
    caplog.clear()
    monkeypatch.setenv("SO8T_PROGRESS", "0")
    for _ in logs.progress(range(4), desc="off", unit="rec"):
        time.sleep(0.1)
    assert not caplog.records
