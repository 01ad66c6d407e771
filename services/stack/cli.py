"""Run chain stages in the compose stack: wait (bounded) for each stage's upstream on /data, then run its command.

    python -m services.stack train [-- EXTRA ARGS]           the profile's `train` stage ($SO8T_PROFILE)
    python -m services.stack ollama-import ollama-smoke       several stages, in order
    python -m services.stack --print bake                     show the stage's upstream and command, run nothing
    python -m services.stack --serve ollama [-- EXTRA ARGS]   exec the think API on what the chain made
    python -m services.stack --config configs/pipeline/x.yaml train     another profile file

The profile is `--config`, else configs/pipeline/$SO8T_PROFILE.yaml (compose sets SO8T_PROFILE in every container).
A stage's command, its upstream and every path come from the chain's one description (services/pipeline/plan.py:
the profile and shared.layout); EXTRA ARGS (what `docker compose run <service> ...` appends) go to the last
command. When a stage's command ends, its finish marker (`<run>/stack/<stage>.json`: pipeline id, exit code)
tells the stages after it. `--serve llamacpp` and `--serve llama-server` first wait for the converter's GGUFs.
Any command can be wrapped the same way: `--name NAME [--after NAME=DIR] -- COMMAND` (several commands separated by
a literal `&&` argument).
Environment: SO8T_PROFILE, SO8T_PIPELINE_ID (set by `make pipeline`), SO8T_WAIT_TIMEOUT (default 7d; 0 = look once
and fail at once), SO8T_WAIT_INTERVAL (default 10s), SO8T_STACK_DIR (only for --name).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROFILES = Path("configs") / "pipeline"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PROFILE_FILE", help="pipeline profile file (default: configs/pipeline/$SO8T_PROFILE.yaml)"
    )
    p.add_argument("--print", action="store_true", help="print each stage's upstream and commands, run nothing")
    p.add_argument(
        "--serve",
        choices=("ollama", "llamacpp", "openai", "llama-server"),
        metavar="BACKEND",
        help="exec the think API on the profile's model: its Ollama tag, its GGUF through llama.cpp, or through an "
        "OpenAI-compatible engine (openai: give --upstream); llama-server: exec that engine on the GGUF",
    )
    p.add_argument("--name", help="wrap a command of your own: its stage name (its finish marker's name)")
    p.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="NAME[=DIR]",
        help="with --name: upstream stage that must be done first: its manifest.json in DIR, and, under "
        "a pipeline id, its finish marker from this pipeline; repeat for several",
    )
    p.add_argument(
        "--timeout",
        default=os.environ.get("SO8T_WAIT_TIMEOUT", "7d"),
        help="give up waiting after this long (600, 30m, 12h, 7d; 0 = look once). Default $SO8T_WAIT_TIMEOUT or 7d",
    )
    p.add_argument("--interval", default=os.environ.get("SO8T_WAIT_INTERVAL", "10s"), help="poll interval (10s)")
    p.add_argument(
        "--stack-dir",
        default=None,
        help="finish markers (default <run>/stack, or with --name $SO8T_STACK_DIR or $DATA_DIR/stack)",
    )
    p.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        metavar="STAGE... [-- ARGS] | -- COMMAND",
        help="stages of the profile's chain (then extra arguments for the last one after --), or "
        "with --name the command after --",
    )


def _split(words: list[str]) -> tuple[list[str], list[str]]:
    if "--" in words:
        i = words.index("--")
        return words[:i], words[i + 1 :]
    return words, []


def profile_path(config: str | None) -> Path:
    """--config, else configs/pipeline/$SO8T_PROFILE.yaml."""
    from shared.errors import InputError

    if config:
        return Path(config)
    name = os.environ.get("SO8T_PROFILE", "").strip()
    if not name:
        raise InputError("no profile: give --config configs/pipeline/<profile>.yaml or set SO8T_PROFILE")
    return PROFILES / f"{name}.yaml"


def profile_jobs(profile: str | Path, names: list[str], extra: list[str], layout=None):
    """The named stages of the profile's chain as jobs (EXTRA appended to the last command), and the stack dir."""
    from services.pipeline.config import PipelineConfig
    from services.pipeline.plan import plan, stage
    from services.stack.wait import Job, Upstream
    from shared.config import load_config
    from shared.layout import Layout

    cfg = load_config(PipelineConfig, profile)
    layout = layout or Layout.from_env()
    chain = plan(cfg, layout)
    outputs = {s.name: s.output for s in chain}
    stages = [stage(chain, name) for name in names]
    jobs = [Job(s.name, [Upstream(u, outputs.get(u)) for u in s.after], [list(c) for c in s.commands]) for s in stages]
    if jobs:
        jobs[-1].commands[-1] += extra
    return jobs, layout.run(cfg.run_id).stack


def serve_job(profile: str | Path, backend: str, extra: list[str], layout=None):
    """The think API (or llama-server) as a job: what it waits for (the GGUFs, for llama.cpp) and its command."""
    from services.pipeline.config import PipelineConfig
    from services.pipeline.plan import engine_command, plan, serve_command
    from services.stack.wait import Job, Upstream
    from shared.config import load_config
    from shared.layout import Layout

    cfg = load_config(PipelineConfig, profile)
    layout = layout or Layout.from_env()
    convert = next(s for s in plan(cfg, layout) if s.name == "convert")
    after = [Upstream("convert", convert.output)] if backend in ("llamacpp", "llama-server") else []
    if backend == "llama-server":
        return Job("llama-server", after, [[*engine_command(cfg, layout), *extra]]), layout.run(cfg.run_id).stack
    return Job("think-api", after, [[*serve_command(cfg, layout, backend), *extra]]), layout.run(cfg.run_id).stack


def run(args: argparse.Namespace) -> int:
    from services.stack.wait import Job, Upstream, run_jobs, split_commands, stack_dir_from_env, wait_for_job

    head, tail = _split(args.words)
    if args.name:
        try:
            jobs = [Job(args.name, [Upstream.parse(s) for s in args.after], split_commands(tail) if tail else [])]
        except ValueError as err:
            print(f"python -m services.stack: {err}", file=sys.stderr)
            return 2
        if not jobs[0].commands:
            print("python -m services.stack: no command given (put it after --)", file=sys.stderr)
            return 2
        stack_dir = stack_dir_from_env()
    elif args.serve:
        job, stack_dir = serve_job(profile_path(args.config), args.serve, tail)
        if args.print:
            jobs = [job]
        else:
            code = wait_for_job(job, Path(args.stack_dir) if args.stack_dir else stack_dir, args.timeout, args.interval)
            if code:
                return code
            argv = job.commands[0]
            print("exec:", " ".join(argv), file=sys.stderr, flush=True)
            os.execvp(argv[0], argv)  # llama-server is found on PATH
    else:
        try:
            jobs, stack_dir = profile_jobs(profile_path(args.config), head, tail)
        except KeyError as err:
            print(f"python -m services.stack: {err.args[0]}", file=sys.stderr)
            return 2
        if not jobs:
            print("python -m services.stack: name the stage(s) of the chain to run", file=sys.stderr)
            return 2
    if args.print:
        for j in jobs:
            print(f"{j.name}: after {', '.join(u.describe() for u in j.upstreams) or 'nothing'}")
            print("\n".join("  " + " ".join(c) for c in j.commands))
        return 0
    return run_jobs(jobs, Path(args.stack_dir) if args.stack_dir else stack_dir, args.timeout, args.interval)
