"""The stages under fault: how each is built, killed, filled and corrupted, and what counts as having survived.

`Chain` builds the tiny chain once (dataset, a short real training run, bake, convert) as the references every
trial is compared with; the `kill_*`, `fill_*` and `corrupt_*` functions run N trials of one (stage, fault) and
return its Tally. tests/faults runs them with small N, bench/faults.py with dozens.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from fault_core import (
    REPO,
    Tally,
    artifact_key,
    cli,
    digests,
    disk_message,
    env,
    fill,
    flip,
    kill_at,
    leftovers,
    must,
    piled_up,
    restore,
    run,
    small_fs,
    timed,
    unfill,
    verifies,
)

from shared import manifest

sys.path.insert(0, str(REPO / "tests"))

EXAMPLES = str(REPO / "examples" / "four_class" / "*.jsonl")
POINTS = ("staging-built", "replace-dir")  # shared.atomic.fault: the two instants a random kill rarely hits
EVAL_VOLATILE = frozenset({"report.md", "report.png"})  # their bytes carry tokens/s


def write_yaml(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(obj, sort_keys=False), encoding="utf-8")
    return path


def train_config(path: Path, max_steps: int = 6) -> Path:
    """configs/train/tiny.yaml for the faults: a short run with a checkpoint every 2 steps, no TensorBoard."""
    cfg = yaml.safe_load((REPO / "configs" / "train" / "tiny.yaml").read_text())
    cfg["train"].update(max_steps=max_steps, num_threads=1, eval_steps=None)
    cfg["checkpoint"].update(save_steps=2, keep=3, save_minutes=None)
    cfg["logging"].update(log_steps=1, tensorboard=False)
    return write_yaml(path, cfg)


def big_input(path: Path, copies: int) -> Path:
    """The example four-class records `copies` times over, each copy's requests made unique: a dataset build that
    takes long enough for random kills to land inside it."""
    rows = [json.loads(line) for f in sorted(Path(EXAMPLES).parent.glob("*.jsonl")) for line in f.open()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(copies):
            for r in rows:
                r = dict(r)
                key = "instruction" if "instruction" in r else "text"
                r[key] = f"{r[key]} (#{i})"
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def dataset_cmd(inputs: str | Path, out: Path, *extra: str) -> list[str]:
    return cli("services.dataset", "--input", inputs, "--output", out, *extra)


def train_cmd(cfg: Path, dataset: Path, out: Path, base: Path) -> list[str]:
    return cli(
        "services.trainer", "--config", cfg, "--dataset", dataset / "train.jsonl", "--output-dir", out,
        "--base-model", base,
    )  # fmt: skip


def bake_cmd(trained: Path, out: Path, dtype: str, *extra: str) -> list[str]:
    return cli("services.baker", "--trained", trained, "--output", out, "--dtype", dtype, *extra)


def convert_cmd(model: Path, out: Path, types: list[str], *extra: str) -> list[str]:
    return cli("services.converter", "--model", model, "--output-dir", out, "--name", "tiny", "--types", *types, *extra)


@dataclass
class Chain:
    """The references: every artifact of the tiny chain built once, uninterrupted, with how long each build took."""

    root: Path
    base: Path
    big: Path = field(init=False)
    dataset: Path = field(init=False)  # the example set through the dataset stage (the trainer's input)
    train_cfg: Path = field(init=False)
    trained: Path = field(init=False)  # <train>/final
    baked: Path = field(init=False)
    gguf: Path = field(init=False)
    seconds: dict[str, float] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ref = self.root / "ref"
        self.big = big_input(self.root / "input" / "big.jsonl", copies=60)
        self.dataset, self.trained = ref / "dataset", ref / "train" / "final"
        self.baked, self.gguf = ref / "baked", ref / "gguf"
        self.train_cfg = train_config(self.root / "train.yaml")
        self._build("dataset", dataset_cmd(EXAMPLES, self.dataset))
        self._build("dataset-big", dataset_cmd(self.big, ref / "dataset-big", "--seed", "2"), ref / "dataset-big")
        self._build("train", train_cmd(self.train_cfg, self.dataset, ref / "train", self.base), self.trained)
        self._build("bake", bake_cmd(self.trained, self.baked, "float32"), self.baked)
        self._build("convert", convert_cmd(self.baked, self.gguf, ["Q8_0", "Q4_K_M"]), self.gguf)

    def _build(self, name: str, argv: list[str], output: Path | None = None) -> None:
        r, self.seconds[name] = timed(argv)
        must(r, f"the reference {name} build")
        if output is not None:
            self.keys[name] = artifact_key(output)

    def ggufs(self, root: Path | None = None) -> list[Path]:
        return sorted((root or self.gguf).glob("*.gguf"))


# --- SIGKILL at random instants ------------------------------------------------------------------------------------


@dataclass
class KillJob:
    stage: str
    argv: list[str]  # the new build, over the previous good artifact
    duration: float  # of an uninterrupted run: the kills land uniformly in [0, duration]
    scope: Path  # where leftovers are looked for
    judge: Callable[[], tuple[str, list[str]]]  # after a kill: the outcome, or what broke
    final: Callable[[], list[str]]  # after the uninterrupted rerun: what differs from the reference
    reset: Callable[[], None] = lambda: None  # before the next trial
    points: tuple[str, ...] = POINTS
    power_cut_every: int = 0  # every k-th kill takes the whole process group (0: the main process alone)
    environ: dict[str, str] = field(default_factory=env)


def kill_trials(job: KillJob, n: int, rng: random.Random, tally: Tally) -> Tally:
    """`n` kills at random instants (and one at each fault point), each judged; then an uninterrupted rerun that
    must end with the reference artifact and no leftover."""
    t0 = time.monotonic()
    for i in range(n + len(job.points)):
        point = job.points[i - n] if i >= n else None
        environ = dict(job.environ, SO8T_FAULT=point) if point else job.environ
        group = bool(job.power_cut_every) and i % job.power_cut_every == job.power_cut_every - 1
        k = kill_at(job.argv, None if point else rng.uniform(0.0, job.duration), environ, group=group)
        if point and k.returncode != -signal.SIGKILL:
            raise AssertionError(f"{job.stage}: fault point {point} was never reached (rc {k.returncode}):\n{k.output}")
        outcome, broken = job.judge()
        if point:
            outcome = f"{outcome} (killed at {point})"
        elif k.finished_first:
            outcome = "finished before the kill"
        if broken:
            tally.bad(f"trial {i} (kill at {k.at}, point {point}): " + "; ".join(broken))
        else:
            tally.ok(outcome)
        if k.survivors:
            tally.check(f"trial {i}: helper processes {k.survivors} outlived the killed {job.stage}")
        piles = piled_up(job.scope)
        tally.check(f"trial {i}: leftovers pile up instead of being removed: {piles}" if piles else None)
        job.reset()
    r = run(job.argv, job.environ)
    if r.returncode != 0:
        tally.check(f"the rerun failed ({r.returncode}): {r.stderr[-2000:]}")
    else:
        for what in job.final():
            tally.check(f"the rerun: {what}")
        left = leftovers(job.scope)
        tally.check(f"the rerun left leftovers: {left}" if left else None)
    tally.notes.append("rerun = uninterrupted, 0 leftovers" if not tally.violations else "rerun checked")
    tally.seconds += time.monotonic() - t0
    return tally


def single(output: Path, previous: dict[str, str] | None, reference: Any, volatile=frozenset()):
    """judge and final of a stage whose artifact is one directory: the previous one byte for byte, or the new one
    complete, verifying and equal to the reference."""

    def judge() -> tuple[str, list[str]]:
        now = digests(output)
        if now == previous:
            return "previous intact", []
        if now is None:
            return "", [f"{output} is gone: the previous artifact is lost"]
        why = verifies(output)
        if why:
            return "", [f"a half artifact: {why}"]
        if artifact_key(output, volatile) != reference:
            return "", [f"{output} is complete but not what an uninterrupted build makes"]
        return "new complete", []

    def final() -> list[str]:
        why = verifies(output)
        if why:
            return [why]
        return [] if artifact_key(output, volatile) == reference else [f"{output} differs from the uninterrupted build"]

    return judge, final


def _previous(output: Path, copy: Path) -> dict[str, str]:
    shutil.copytree(output, copy)
    return digests(output) or {}


def kill_dataset(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    """Over a previous dataset (seed 1), a rebuild with seed 2 (another split) is killed."""
    out = work / "datasets" / "big"
    must(run(dataset_cmd(chain.big, out, "--seed", "1")), "the previous dataset")
    previous = _previous(out, work / "previous")
    judge, final = single(out, previous, chain.keys["dataset-big"])
    job = KillJob(
        "dataset",
        dataset_cmd(chain.big, out, "--seed", "2"),
        chain.seconds["dataset-big"],
        out.parent,
        judge,
        final,
        reset=lambda: digests(out) != previous and restore(work / "previous", out),
    )
    return kill_trials(job, n, rng, Tally("dataset", f"SIGKILL at {n} random instants + {len(POINTS)} fault points"))


def kill_bake(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    """Over a previous bake (float16), a float32 bake is killed."""
    out = work / "run" / "baked"
    must(run(bake_cmd(chain.trained, out, "float16")), "the previous bake")
    previous = _previous(out, work / "previous")
    judge, final = single(out, previous, chain.keys["bake"])
    job = KillJob(
        "bake",
        bake_cmd(chain.trained, out, "float32"),
        chain.seconds["bake"],
        out.parent,
        judge,
        final,
        reset=lambda: digests(out) != previous and restore(work / "previous", out),
    )
    return kill_trials(job, n, rng, Tally("bake", f"SIGKILL at {n} random instants + {len(POINTS)} fault points"))


def kill_convert(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    """Over a previous conversion (F16 only), a Q8_0 + Q4_K_M conversion is killed (llama.cpp's converter runs as
    a helper process: it must die with the stage)."""
    out = work / "run" / "gguf"
    must(run(convert_cmd(chain.baked, out, ["F16"])), "the previous conversion")
    previous = _previous(out, work / "previous")
    judge, final = single(out, previous, chain.keys["convert"])
    job = KillJob(
        "convert",
        convert_cmd(chain.baked, out, ["Q8_0", "Q4_K_M"]),
        chain.seconds["convert"],
        out.parent,
        judge,
        final,
        reset=lambda: digests(out) != previous and restore(work / "previous", out),
    )
    return kill_trials(job, n, rng, Tally("convert", f"SIGKILL at {n} random instants + {len(POINTS)} fault points"))


def ollama_cmd(ggufs: list[Path], run_dir: Path, host: str, fmt: str) -> list[str]:
    return cli(
        "services.ollama", "import", "--gguf", *ggufs, "--model", "so8t-faults", "--run-dir", run_dir,
        "--format", fmt, "--host", host, "--wait", "10",
    )  # fmt: skip


def kill_ollama_import(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    """Over a previous import (format simple) into the stand-in Ollama server, an import with the quadruple format
    is killed: the run's directory (Modelfiles + manifest) is the previous one or the new one, and each tag on the
    server is the previous model or the new one."""
    from test_ollama import StandInOllama

    server = StandInOllama()
    server.start()
    try:
        ggufs = chain.ggufs()
        out = work / "run" / "ollama"
        ref_dir = work / "reference" / "ollama"
        r, seconds = timed(ollama_cmd(ggufs, ref_dir, server.url, "quadruple"))
        must(r, "the reference import")
        new_models = {tag: dict(m) for tag, m in server.models.items()}
        reference = _ollama_key(ref_dir)
        must(run(ollama_cmd(ggufs, out, server.url, "simple")), "the previous import")
        old_models = {tag: dict(m) for tag, m in server.models.items()}
        previous = _previous(out, work / "previous")

        def judge() -> tuple[str, list[str]]:
            broken = [
                f"{tag} on the server is neither the previous model nor the new one"
                for tag, m in server.models.items()
                if m not in (old_models.get(tag), new_models.get(tag))
            ]
            now = digests(out)
            if now == previous:
                return "previous intact", broken
            if now is None:
                return "", [*broken, f"{out} is gone"]
            why = verifies(out)
            if why or _ollama_key(out) != reference:
                return "", [*broken, f"a half import directory: {why or 'not the uninterrupted import'}"]
            return "new complete", broken

        def final() -> list[str]:
            bad = [] if _ollama_key(out) == reference else [f"{out} differs from the uninterrupted import"]
            return bad + ([] if server.models == new_models else ["the server's models are not the new ones"])

        def reset() -> None:
            if digests(out) != previous:
                restore(work / "previous", out)
            server.models.update({k: dict(v) for k, v in old_models.items()})

        job = KillJob(
            "ollama import", ollama_cmd(ggufs, out, server.url, "quadruple"), seconds, out.parent, judge, final
        )
        job.reset = reset
        job.points = ("staging-built",)
        tally = Tally("ollama import", f"SIGKILL at {n} random instants + 1 fault point (stand-in server)")
        return kill_trials(job, n, rng, tally)
    finally:
        server.stop()


def _ollama_key(run_dir: Path) -> dict[str, Any] | None:
    m = manifest.read(run_dir)
    if m is None:
        return None
    models = {
        k: {f: v for f, v in d.items() if f not in ("imported_at", "host")} for k, d in m["outputs"]["models"].items()
    }
    return {"files": digests(run_dir, lambda rel: rel == manifest.MANIFEST), "models": models, "config": m["config"]}


# --- the orchestrator ------------------------------------------------------------------------------------------------


def pipeline_profile(work: Path) -> Path:
    """A quick tiny profile: the example set, the tiny base without pre-training, 6 training steps with a checkpoint
    every 2, a float32 bake, Q8_0 only, eval of the Q8_0 GGUF on two val records; no Ollama."""
    return write_yaml(
        work / "faults.yaml",
        {
            "run_id": "faults",
            "dataset": {"id": "example", "inputs": [EXAMPLES]},
            "train": {"config": str(train_config(work / "train.yaml")), "base_model": "tiny"},
            "tiny": {"pretrain_steps": 0},
            "bake": {"dtype": "float32"},
            "convert": {"name": "so8t-faults", "types": ["Q8_0"]},
            "eval": {"splits": ["val"], "models": ["Q8_0"], "max_records": {"val": 2}, "max_tokens": 8},
            "ollama": {"enabled": "never"},
        },
    )


def pipeline_cmd(profile: Path, data: Path) -> list[str]:
    return cli("services.pipeline", "--config", profile, "--data-dir", data, "--no-smoke")


def pipeline_outputs(profile: Path, data: Path) -> dict[str, Path]:
    from services.pipeline.config import PipelineConfig
    from services.pipeline.plan import plan
    from shared.config import load_config
    from shared.layout import Layout

    cfg = load_config(PipelineConfig, profile)
    return {s.name: s.output for s in plan(cfg, Layout(data)) if s.output is not None}


def kill_pipeline(work: Path, n: int, rng: random.Random) -> Tally:
    """The orchestrator killed at random instants, from an empty data folder, restarted after each kill: every
    stage's artifact is absent or complete (and the one an uninterrupted run makes), every checkpoint verifies;
    every other kill is a power cut (the whole process group), the others kill the orchestrator alone (its stage
    must die with it). The last run finishes with the artifacts of an uninterrupted run."""
    from services.trainer import checkpoint

    profile, data = pipeline_profile(work), work / "data"
    environ = env(SO8T_CACHE=str(work / "cache"), OLLAMA_HOST="http://127.0.0.1:9")
    outputs = pipeline_outputs(profile, data)
    r, seconds = timed(pipeline_cmd(profile, data), environ)
    must(r, "the uninterrupted pipeline")
    reference = {name: artifact_key(out, EVAL_VOLATILE, inputs=False) for name, out in outputs.items()}
    shutil.rmtree(data)
    status = data / "runs" / "faults" / "status.json"
    ckpts = data / "runs" / "faults" / "train" / "checkpoints"

    def judge() -> tuple[str, list[str]]:
        broken = []
        for name, out in outputs.items():
            if not out.exists():
                continue
            why = verifies(out)
            if why:
                broken.append(f"{name}: a half artifact: {why}")
            elif artifact_key(out, EVAL_VOLATILE, inputs=False) != reference[name]:
                broken.append(f"{name}: complete but not what an uninterrupted run makes")
        for _, path in checkpoint.checkpoint_dirs(ckpts):
            why = checkpoint.verify(path)
            broken += [f"{path.name}: {why}"] if why else []
        try:
            where = json.loads(status.read_text()).get("stage") if status.exists() else None
        except ValueError as err:
            broken.append(f"{status}: unreadable ({err})")
            where = None
        return f"killed in {where}" if where else "killed before the first stage", broken

    def final() -> list[str]:
        return [
            f"{name}: {verifies(out) or 'differs from the uninterrupted run'}"
            for name, out in outputs.items()
            if verifies(out) or artifact_key(out, EVAL_VOLATILE, inputs=False) != reference[name]
        ]

    job = KillJob("pipeline", pipeline_cmd(profile, data), seconds, data, judge, final, points=(), environ=environ)
    job.power_cut_every = 2
    tally = Tally("pipeline (so8t pipeline)", f"SIGKILL at {n} random instants, restarted after each")
    kill_trials(job, n, rng, tally)
    tally.notes.append("every other kill a power cut (process group)")
    return tally


# --- disk full ---------------------------------------------------------------------------------------------------


def _fill_trials(
    stage: str,
    fs: Path,
    output: Path,
    argv: list[str],
    need: int,
    n: int,
    rng: random.Random,
    reference: Any,
    volatile=frozenset(),
) -> Tally:
    """Over the previous artifact on the small filesystem `fs`, the new build is run with `leave` bytes free
    (random, less than the `need` it takes): it must exit non-zero naming the path and the cause, leave the
    previous artifact byte for byte and no leftover. With the space back, the rerun makes the reference."""
    tally = Tally(stage, f"ENOSPC: output on a small tmpfs with 0 to {need // 2**20 + 1} MiB free")
    t0 = time.monotonic()
    previous = digests(output)
    for i in range(n):
        leave = fill(fs, rng.randrange(0, need))
        r = run(argv)
        problems = []
        if r.returncode == 0:
            problems.append(f"exited 0 with {leave} bytes free")
        problems += [p for p in [disk_message(r.stderr, fs)] if p]
        if digests(output) != previous:
            problems.append("the previous artifact changed")
        left = leftovers(output.parent)
        problems += [f"leftovers: {left}"] if left else []
        if problems:
            tally.bad(f"trial {i} ({leave} bytes free): " + "; ".join(problems))
        else:
            tally.ok("refused: named path + ENOSPC, previous intact")
    unfill(fs)
    r = run(argv)
    if r.returncode != 0:
        tally.check(f"the rerun with space failed: {r.stderr[-1500:]}")
    elif artifact_key(output, volatile) != reference or verifies(output):
        tally.check(f"the rerun did not make the reference artifact: {verifies(output)}")
    tally.notes.append("rerun with space = uninterrupted")
    tally.seconds += time.monotonic() - t0
    return tally


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fill_dataset(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    size = _size(chain.root / "ref" / "dataset-big")
    with small_fs(work / "fs", 3 * size + (2 << 20)) as fs:
        out = fs / "datasets" / "big"
        must(run(dataset_cmd(chain.big, out, "--seed", "1")), "the previous dataset")
        return _fill_trials(
            "dataset", fs, out, dataset_cmd(chain.big, out, "--seed", "2"), 2 * size, n, rng, chain.keys["dataset-big"]
        )


def fill_bake(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    size = _size(chain.baked)
    with small_fs(work / "fs", 3 * size) as fs:
        out = fs / "baked"
        must(run(bake_cmd(chain.trained, out, "float16")), "the previous bake")
        return _fill_trials("bake", fs, out, bake_cmd(chain.trained, out, "float32"), size, n, rng, chain.keys["bake"])


def fill_convert(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    quants = _size(chain.gguf)  # Q8_0 + Q4_K_M; the staging directory holds them and the F16 they come from
    with small_fs(work / "fs", 9 * quants) as fs:
        out = fs / "gguf"
        must(run(convert_cmd(chain.baked, out, ["F16"])), "the previous conversion")
        need = 3 * quants // 2  # well under the staging directory's peak (F16 + both), so every trial runs out
        argv = convert_cmd(chain.baked, out, ["Q8_0", "Q4_K_M"])
        return _fill_trials("convert", fs, out, argv, need, n, rng, chain.keys["convert"])


def fill_train(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    """Training with its output on a small tmpfs that fills up while it runs (after its first checkpoint): the
    trainer exits non-zero naming the path and the cause, its newest checkpoint verifies, and with the space back
    it resumes from it and ends with the artifact of an uninterrupted run."""
    from services.trainer import checkpoint

    tally = Tally("train", "ENOSPC: the disk fills up between two checkpoints")
    t0 = time.monotonic()
    cfg = train_config(work / "train.yaml", max_steps=30)
    ckpt_size = _size(chain.trained.parent / "checkpoints") // 3
    for i in range(n):
        with small_fs(work / f"fs{i}", 64 << 20) as fs:
            out = fs / "train"
            argv = train_cmd(cfg, chain.dataset, out, chain.base)
            p = subprocess.Popen(argv, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 300
            while not (out / "checkpoints" / "checkpoint-2" / checkpoint.MARKER).is_file():
                if p.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            left = fill(fs, rng.randrange(0, ckpt_size))
            stdout, stderr = p.communicate(timeout=600)
            problems = []
            if p.returncode == 0:
                problems.append(f"the trainer finished with {left} bytes free")
            problems += [x for x in [disk_message(stderr, fs)] if x]
            steps = checkpoint.checkpoint_dirs(out / "checkpoints")
            if not steps:
                problems.append("no checkpoint left")
            else:
                why = checkpoint.verify(steps[0][1])
                problems += [f"the newest checkpoint {steps[0][1].name} is bad: {why}"] if why else []
            corrupt = list((out / "checkpoints").glob("*.corrupt"))
            problems += [f"set aside: {corrupt}"] if corrupt else []
            unfill(fs)
            r = run(argv)
            if r.returncode != 0:
                problems.append(f"the rerun failed: {r.stderr[-1500:]}")
            elif steps and f"resuming from {steps[0][1].name}" not in r.stderr:
                problems.append(f"the rerun did not resume from {steps[0][1].name}")
            elif verifies(out / "final"):
                problems.append(f"the resumed run's final artifact: {verifies(out / 'final')}")
            if problems:
                tally.bad(f"trial {i}: " + "; ".join(problems))
            else:
                tally.ok(f"refused at step {steps[0][0] + 1}-{steps[0][0] + 2}: newest good checkpoint kept, resumed")
    tally.outcomes = _merge_steps(tally.outcomes)
    tally.seconds += time.monotonic() - t0
    return tally


def _merge_steps(outcomes):
    from collections import Counter

    out: Counter = Counter()
    for name, k in outcomes.items():
        out[
            "refused: named path + ENOSPC, newest good checkpoint kept, resumed" if name.startswith("refused") else name
        ] += k
    return out


# --- corruption ----------------------------------------------------------------------------------------------------


def corrupt_checkpoint(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    """A run killed right after checkpoint-4; a random byte of a random file of checkpoint-4 flipped; the restart
    must set it aside, resume from checkpoint-2 and end with the uninterrupted run's artifact (the flipped bytes were
    never used)."""
    tally = Tally("train (checkpoint)", "1 flipped byte in the newest checkpoint")
    t0 = time.monotonic()
    out = work / "train"
    argv = train_cmd(chain.train_cfg, chain.dataset, out, chain.base)
    r = run(argv, env(SO8T_FAULT="checkpoint-done:4"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    pristine = work / "pristine"
    shutil.copytree(out, pristine)
    reference = artifact_key(chain.trained)
    for i in range(n):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        victim_dir = out / "checkpoints" / "checkpoint-4"
        victim = rng.choice(sorted(p for p in victim_dir.iterdir() if p.name != "checkpoint.json"))
        offset = rng.randrange(victim.stat().st_size)
        flip(victim, offset, 1 << rng.randrange(8))
        r = run(argv)
        problems = []
        if r.returncode != 0:
            problems.append(f"the restart failed: {r.stderr[-1500:]}")
        if "checkpoint-4 failed verification" not in r.stderr and f"{victim.name} does not match" not in r.stderr:
            problems.append("the flipped checkpoint was not reported")
        if "resuming from checkpoint-2" not in r.stderr:
            problems.append("the restart did not resume from checkpoint-2")
        if artifact_key(out / "final") != reference:
            problems.append("the final artifact is not the uninterrupted run's: the corrupt checkpoint was used")
        if problems:
            tally.bad(f"trial {i} ({victim.name} byte {offset}): " + "; ".join(problems))
        else:
            tally.ok("detected by the trainer (sha256), set aside, resumed from the previous; final = uninterrupted")
    tally.seconds += time.monotonic() - t0
    return tally


def _error_names(text: str, path: Path) -> str | None:
    if "Traceback" in text:
        return "a traceback: " + text[-1000:]
    if str(path) not in text:
        return f"the error does not name {path}: " + text[-600:]
    return None


def corrupt_baked_shard(chain: Chain, work: Path, n: int, rng: random.Random) -> Tally:
    """A random byte of the baked model.safetensors flipped: the converter must refuse it, naming the file, before
    writing anything. Also noted: whether safetensors itself would have noticed (a flip in the header) or read the
    changed tensor without a word (a flip in the data)."""
    tally = Tally("convert (reads the bake)", "1 flipped byte in the baked safetensors shard")
    t0 = time.monotonic()
    baked = work / "baked"
    shutil.copytree(chain.baked, baked)
    shard = baked / "model.safetensors"
    pristine = shard.read_bytes()
    unnoticed = 0
    for i in range(n):
        shard.write_bytes(pristine)
        offset = rng.randrange(len(pristine))
        flip(shard, offset, 1 << rng.randrange(8))
        unnoticed += not _safetensors_notices(shard)
        out = work / f"gguf-{i}"
        r = run(convert_cmd(baked, out, ["Q8_0"]))
        problems = [] if r.returncode == 2 else [f"exit code {r.returncode}, not 2"]
        problems += [x for x in [_error_names(r.stderr, shard)] if x]
        problems += ["the converter wrote output"] if out.exists() else []
        if problems:
            tally.bad(f"trial {i} (byte {offset}): " + "; ".join(problems))
        else:
            tally.ok("refused by the converter (sha256 against the bake's manifest), nothing written")
    tally.notes.append(f"safetensors alone would have read {unnoticed} of {n} without an error")
    tally.seconds += time.monotonic() - t0
    return tally


def _safetensors_notices(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                if t.is_floating_point() and not bool(t.isfinite().all()):
                    return True
        return False
    except Exception:
        return True


def corrupt_gguf(chain: Chain, work: Path, n: int, rng: random.Random, standin) -> Tally:
    """A random byte of a random GGUF flipped: eval, the Ollama import and so8t serve (llama.cpp backend) must each
    refuse it, naming the file, and use nothing of it (no eval output, no blob uploaded, no server listening).
    Also noted: whether llama.cpp alone would have noticed (loading it and generating)."""
    from services.pipeline.run import free_port

    tally = Tally("eval / ollama import / serve (read a GGUF)", "1 flipped byte in a GGUF")
    t0 = time.monotonic()
    gguf = work / "gguf"
    shutil.copytree(chain.gguf, gguf)
    pristine = {p: p.read_bytes() for p in chain.ggufs(gguf)}
    unnoticed = 0
    for i in range(n):
        for p, b in pristine.items():
            p.write_bytes(b)
        victim = rng.choice(sorted(pristine))
        offset = rng.randrange(len(pristine[victim]))
        flip(victim, offset, 1 << rng.randrange(8))
        unnoticed += not _llama_notices(victim)
        problems = []
        ev = work / f"eval-{i}"
        r = run(cli("services.eval", "--split", f"val={chain.dataset / 'val.jsonl'}", "--model", f"q=gguf:{victim}",
                    "--output", ev, "--max-tokens", "8"))  # fmt: skip
        problems += [f"eval: exit {r.returncode}"] if r.returncode == 0 else []
        problems += [f"eval: {x}" for x in [_error_names(r.stderr, victim)] if x]
        problems += ["eval wrote a report"] if ev.exists() else []
        r = run(ollama_cmd([victim], work / f"ollama-{i}", standin.url, "simple"))
        problems += [f"import: exit {r.returncode}"] if r.returncode == 0 else []
        problems += [f"import: {x}" for x in [_error_names(r.stderr, victim)] if x]
        digest = "sha256:" + manifest.sha256_file(victim)
        problems += ["import: the corrupt GGUF was uploaded"] if digest in standin.blobs else []
        serve = cli("services.think_api", "--backend", "llamacpp", "--model", victim, "--port", str(free_port()),
                    "--audit-db", work / f"audit-{i}.sqlite3")  # fmt: skip
        try:
            r = run(serve, timeout=180)
            problems += [f"serve: exit {r.returncode}"] if r.returncode == 0 else []
            problems += [f"serve: {x}" for x in [_error_names(r.stderr, victim)] if x]
        except subprocess.TimeoutExpired:
            problems.append("serve: still serving the corrupt GGUF after 180 s")
        if problems:
            tally.bad(f"trial {i} ({victim.name} byte {offset}): " + "; ".join(problems))
        else:
            tally.ok("refused by all three readers (sha256 against the converter's manifest)")
    tally.notes.append(f"llama.cpp alone would have loaded and run {unnoticed} of {n}")
    tally.seconds += time.monotonic() - t0
    return tally


def _llama_notices(path: Path) -> bool:
    """True when llama.cpp fails to load `path` or to generate from it."""
    code = (
        "import sys; from services.converter import llama\n"
        "llm = llama.open_model(sys.argv[1], n_ctx=128, threads=1)\n"
        "ids = llama.tokenize(llm, 'hello')\n"
        "llama.greedy(llm, ids, 4, [])\n"
    )
    r = run([sys.executable, "-c", code, str(path)], timeout=300)
    return r.returncode != 0
