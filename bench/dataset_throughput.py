"""Dataset builder throughput and memory: N synthetic four-class records (ja/en, all labels, 1% broken lines).

    python bench/dataset_throughput.py [--records 100000]
Prints a table: records, seconds, records/s, peak RSS growth (MiB), written / duplicates / rejected.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.dataset.build import DatasetOptions, build  # noqa: E402

LABELS = ["ALLOW", "ESCALATION", "DENY", "REFUSE"]


def make_input(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            if i % 100 == 99:
                fh.write('{"broken": \n')
                continue
            ja = rng.random() < 0.6
            q = (
                f"質問その{i}: 日本の文化について教えてください。"
                if ja
                else f"Question {i}: tell me about Japanese culture."
            )
            a = (
                "日本の文化には茶道や俳句があります。" * rng.randint(1, 8)
                if ja
                else "Japan has tea ceremony and haiku. " * rng.randint(1, 8)
            )
            fh.write(
                json.dumps(
                    {
                        "instruction": q,
                        "output": a,
                        "four_class_label": rng.choice(LABELS),
                        "domain_label": "culture",
                        "safety_label": "safe",
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.records:
            src = Path(tmp) / f"in-{n}.jsonl"
            make_input(src, n)
            base = rss_mib()
            t0 = time.perf_counter()
            m = build([str(src)], Path(tmp) / f"out-{n}", DatasetOptions(), force=True).metrics
            dt = time.perf_counter() - t0
            rows.append((n, dt, n / dt, rss_mib() - base, m["written"], m["duplicates"], m["rejected"]))
    print(
        f"{'records':>9} {'seconds':>8} {'rec/s':>9} {'peak RSS +MiB':>13} {'written':>8} {'dupes':>6} {'rejected':>8}"
    )
    for n, dt, rate, mem, w, d, r in rows:
        print(f"{n:>9} {dt:>8.2f} {rate:>9.0f} {mem:>13.1f} {w:>8} {d:>6} {r:>8}")


if __name__ == "__main__":
    main()
