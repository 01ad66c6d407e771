"""The fault campaign: kill, fill and corrupt every stage N times and print the "faults survived" table.

    python bench/faults.py                 # dozens of trials per (stage, fault): the README's table
    python bench/faults.py --trials 3 --only kill_bake corrupt_gguf
    python bench/faults.py --json faults.json

The machinery is tests/faults (fault_core, fault_jobs, fault_api); `make test` runs the same jobs with a few trials.
Disk-full jobs need root (a small tmpfs is mounted); they are reported as skipped otherwise. Exits 1 on any
violation (a lost or half artifact, a leftover that outlives the next run, a corrupt file used, an unaudited 200).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "faults"), str(REPO / "tests")]

import fault_jobs as jobs  # noqa: E402
from fault_core import Tally, mount_refusal, table  # noqa: E402

from shared.tiny import build_tiny_model  # noqa: E402

CHAIN_JOBS = ["kill_dataset", "kill_bake", "kill_convert", "kill_ollama_import"]
FILL_JOBS = ["fill_dataset", "fill_bake", "fill_convert", "fill_train"]
CORRUPT_JOBS = ["corrupt_checkpoint", "corrupt_baked_shard", "corrupt_gguf"]
OTHER_JOBS = ["kill_pipeline", "api_load_kill", "api_fuzz"]
ALL = CHAIN_JOBS + FILL_JOBS + CORRUPT_JOBS + OTHER_JOBS


def run_job(name: str, chain: jobs.Chain | None, work: Path, n: int, rng: random.Random) -> Tally | None:
    work.mkdir(parents=True)
    if name.startswith("fill_") and (why := mount_refusal()):
        print(f"  {name}: skipped ({why})", file=sys.stderr)
        return None
    if name == "kill_pipeline":
        return jobs.kill_pipeline(work, n, rng)
    if name == "api_load_kill":  # n SIGKILLs of the server under 16 clients
        import fault_api

        return fault_api.kill_api_under_load(work, kills=n, clients=16, load_s=4.0)
    if name == "api_fuzz":
        import fault_api

        return fault_api.fuzz_api(work, max_examples=max(30, 5 * n))
    if name == "corrupt_gguf":
        from test_ollama import StandInOllama

        server = StandInOllama()
        server.start()
        try:
            return jobs.corrupt_gguf(chain, work, n, rng, server)  # type: ignore[arg-type]
        finally:
            server.stop()
    return getattr(jobs, name)(chain, work, n, rng)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24, help="random trials per (stage, fault) (default 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=ALL, help="run these jobs only")
    ap.add_argument("--work", type=Path, help="working directory (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, help="also write every tally as JSON here")
    args = ap.parse_args(argv)
    names = args.only or ALL
    rng = random.Random(args.seed)
    tallies: list[Tally] = []
    with tempfile.TemporaryDirectory(prefix="so8t-faults-") as tmp:
        work = args.work or Path(tmp)
        chain = None
        if any(n not in OTHER_JOBS for n in names):
            t0 = time.monotonic()
            chain = jobs.Chain(work / "chain", build_tiny_model(work / "base"))
            print(f"reference chain built in {time.monotonic() - t0:.0f} s: {chain.seconds}", file=sys.stderr)
        for name in names:
            t0 = time.monotonic()
            print(f"{name} ({args.trials} trials) ...", file=sys.stderr, flush=True)
            tally = run_job(name, chain, work / name, args.trials, rng)
            if tally is not None:
                tallies.append(tally)
                print(f"  {tally.outcome()} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(table(tallies))
    if args.json:
        args.json.write_text(json.dumps([t.as_dict() for t in tallies], indent=2) + "\n")
    bad = [v for t in tallies for v in t.violations]
    for v in bad:
        print("VIOLATION:", v, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
