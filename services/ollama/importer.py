"""Import GGUFs into an Ollama server with the official client (0.6.x): `create_blob`, then `create`.

The 0.6 client has no Modelfile argument: the GGUF goes up as a blob (sha256-addressed) and `create` names it in
`files`, with the template, system prompt and parameters of the generated Modelfile. The same Modelfile is saved
beside the run (`<run>/ollama/Modelfile.<tag>`) for `ollama create -f`. The server may still be starting (compose
starts both together), so connecting is retried with tenacity until `--wait` runs out.

Each GGUF is checked against the converter's manifest before it is uploaded (a corrupt file is never imported).
The run's directory is one artifact (shared.stage): once every model is created, the Modelfiles and the manifest
(earlier imports and smoke.json kept) are built in a staging directory that replaces it as a whole, so a killed
import leaves the previous directory or the new one, never Modelfiles of one import beside the manifest of another.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import ollama
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from services.ollama import modelfile
from shared import atomic, logs, manifest, stage
from shared.errors import StageError
from shared.layout import GGUF_FILE_TYPES, GGUF_TYPES, ollama_tag
from shared.think_format import Format

log = logs.get("ollama")
T = TypeVar("T")


_TRANSIENT = (ConnectionError, httpx.TransportError)


class ImportFailed(StageError, RuntimeError):
    """An import that cannot go on; the message says which file, model or server."""


@dataclass(frozen=True)
class Imported:
    model: str
    gguf: Path
    qtype: str
    digest: str
    modelfile: Path  # where record() puts it
    modelfile_text: str


def gguf_qtype(path: Path) -> str:
    """F16, Q8_0 or Q4_K_M: from the converter's file name (`<name>-<TYPE>.gguf`), else from the GGUF header."""
    for qtype in GGUF_TYPES:
        if path.name.endswith(f"-{qtype}.gguf"):
            return qtype
    try:
        import gguf

        field = gguf.GGUFReader(path).fields[gguf.Keys.General.FILE_TYPE]
        code = int(field.parts[field.data[0]][0])
        by_code = {int(gguf.LlamaFileType[name]): qtype for qtype, name in GGUF_FILE_TYPES.items()}
    except Exception as err:  # unreadable header: the caller gets a clear message
        raise ImportFailed(f"{path}: cannot tell its quantisation ({err}); give the tag in --model name:tag") from None
    if code not in by_code:
        raise ImportFailed(
            f"{path}: GGUF file_type {code} is not one of {', '.join(GGUF_TYPES)}; give --model name:tag"
        )
    return by_code[code]


def model_tag(model: str, qtype: str) -> str:
    """`name` -> `name:<qtype tag>`; an explicit `name:tag` is kept."""
    return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:{ollama_tag(qtype)}"


def client(host: str | None = None, timeout: float | None = None) -> ollama.Client:
    """The official client; with no host it reads OLLAMA_HOST (default http://127.0.0.1:11434)."""
    return ollama.Client(host=host, timeout=timeout)


def host_of(c: ollama.Client) -> str:
    """The server URL the client resolved (the 0.6 client keeps it only on its httpx client)."""
    return str(c._client.base_url)


def retrying(call: Callable[[], T], wait_s: float, what: str) -> T:
    """Run `call`, retrying connection failures with exponential backoff for up to `wait_s` seconds."""

    def before_sleep(state) -> None:
        log.info("%s: server not reachable yet (%s), retrying", what, state.outcome.exception())

    for attempt in Retrying(
        stop=stop_after_delay(wait_s),
        wait=wait_exponential(multiplier=0.25, max=5),
        retry=retry_if_exception_type(_TRANSIENT),
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            return call()
    raise AssertionError("unreachable")  # Retrying either returns or re-raises


def wait_for_server(c: ollama.Client, wait_s: float) -> None:
    try:
        retrying(c.list, wait_s, "ollama")
    except _TRANSIENT as err:
        raise ImportFailed(
            f"no Ollama server answered at {host_of(c)} within {wait_s:.0f}s ({err}); "
            "start it (docker compose up ollama, or `ollama serve`) or set OLLAMA_HOST"
        ) from None


def modelfile_for(gguf: Path, run_dir: Path, fmt: Format) -> str:
    """The Modelfile of `gguf` as saved in `run_dir` (FROM relative to it)."""
    return modelfile.render(modelfile.from_path(gguf, run_dir), fmt)


def import_gguf(
    c: ollama.Client, gguf: Path, model: str, run_dir: Path, fmt: Format = "simple", wait_s: float = 0
) -> Imported:
    """Upload one GGUF and create `model` from it. Raises ImportFailed on any failure (never a warning)."""
    if not gguf.is_file():
        raise ImportFailed(f"{gguf}: GGUF file not found")
    stage.verified_input(gguf)  # the converter's manifest beside it says what it wrote: a corrupt file is not uploaded
    qtype = gguf_qtype(gguf)
    name = model_tag(model, qtype)
    mf = run_dir / f"Modelfile.{name.rsplit(':', 1)[1]}"
    log.info("uploading %s (%.1f MiB) to %s", gguf, gguf.stat().st_size / 2**20, host_of(c))
    try:
        digest = retrying(lambda: c.create_blob(gguf), wait_s, "ollama blob upload")
        log.info("creating %s from blob %s", name, digest)
        resp = c.create(
            model=name,
            files={gguf.name: digest},
            template=modelfile.TEMPLATE,
            system=modelfile.system(fmt),
            parameters=modelfile.parameters(),
            stream=False,
        )
    except ollama.ResponseError as err:
        raise ImportFailed(
            f"Ollama at {host_of(c)} refused {name} from {gguf}: HTTP {err.status_code}: {err.error}"
        ) from None
    except _TRANSIENT as err:
        raise ImportFailed(f"lost the Ollama server at {host_of(c)} while importing {gguf}: {err}") from None
    if resp.status != "success":
        raise ImportFailed(f"Ollama at {host_of(c)} answered status {resp.status!r} creating {name}")
    return Imported(name, gguf, qtype, digest, mf, modelfile_for(gguf, run_dir, fmt))


def record(run_dir: Path, done: list[Imported], fmt: Format, host: str, started: float) -> Path:
    """Publish the run's ollama directory: the Modelfiles of `done` and a manifest of every model imported so far
    (earlier imports and other files such as smoke.json are carried over), replacing the directory as a whole."""
    old = manifest.read(run_dir) or {}
    models: dict[str, Any] = dict(old.get("outputs", {}).get("models", {}))
    inputs: dict[str, Any] = dict(old.get("inputs", {}))
    for imp in done:
        inputs[imp.model] = {
            "path": str(imp.gguf),
            "kind": "file",
            "sha256": imp.digest.removeprefix("sha256:"),
            "bytes": imp.gguf.stat().st_size,
        }
        models[imp.model] = {
            "gguf": str(imp.gguf),
            "qtype": imp.qtype,
            "digest": imp.digest,
            "modelfile": imp.modelfile.name,
            "host": host,
            "imported_at": manifest.utc_stamp(),
        }
    config = {"format": fmt, "template": modelfile.TEMPLATE, "parameters": modelfile.parameters()}

    def build(tmp: Path) -> stage.Built:
        if run_dir.is_dir():
            for f in sorted(run_dir.iterdir()):
                if f.is_file() and f.name != manifest.MANIFEST and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
        for imp in done:
            atomic.write_text(tmp / imp.modelfile.name, imp.modelfile_text)
        return stage.Built({"models": len(models)}, {"models": models})

    stage.publish(stage.Spec("ollama", run_dir, inputs, config), build, started)
    return run_dir / manifest.MANIFEST
