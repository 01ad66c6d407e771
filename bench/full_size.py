"""Every stage at Phi-3.5-mini size on the CPU: what the tiny model cannot show (memory, time, the real tokenizer).

    python bench/full_size.py --tokenizer ../shared/fixtures/phi35-tokenizer      (users: the hub id)
    python bench/full_size.py --tokenizer DIR --only twin                          one part again
    make rehearsal                                                                 the same, with the fixture

A model of the real Phi-3.5-mini configuration (the tokenizer's config.json when it has one: hidden 3072, 32
layers, longrope, sliding window, vocabulary 32064), random weights written once as bf16 shards and cached in
~/.cache/so8t/full_size/base, with the real tokenizer, through every stage with the full profile's settings except
what the table names:

  dataset   examples/four_class + one record that fills 2048 tokens, the real tokenizer's chat template
  train     8-bit, gates on all 32 layers, LoRA r 64, PET, seq 2048, --allow-cpu; a run of --steps steps, and the
            same run SIGKILLed after its first checkpoint and restarted: the adapters and gates must be equal
  bake      bf16, with its float32 verification (host RAM checked first)
  convert   F16, Q8_0, Q4_K_M, each checked against HF float32
  eval      the three GGUFs on a handful of val records
  serve     POST /think and POST /v1/chat/completions answered from the Q4_K_M (llama.cpp in-process)
  twin      one seq-2048 8-bit forward + backward + step, reentrant vs non-reentrant checkpointing (bench/_fit.py),
            on the real width with --twin-layers of the 32 layers (default 4): the extra memory per layer, x32

Each stage runs its real CLI in a child process; the table gives wall time, peak RSS (the child's process tree,
sampled every 0.2 s), artifact sizes and the checks' figures. Results are kept in <work>/results.json: a rerun does
only what is missing (--redo STAGE to repeat one). A stage that fails or does not fit is named with what it needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

STAGES = ("base", "dataset", "train", "bake", "convert", "eval", "serve", "twin")
CACHE = Path(os.environ.get("SO8T_CACHE", Path.home() / ".cache" / "so8t")) / "full_size"
# what differs from configs/train/full.yaml, and why (the rest is the full profile as users run it)
TRAIN_CHANGES = {
    "train.max_steps": "--steps (a few optimizer steps instead of 3 epochs)",
    "train.grad_accum": "1 instead of 16 (16 micro-batches of 3.8 B on 2 CPU cores take ~30 min a step)",
    "train.deterministic": "true (bitwise resume check on the CPU)",
    "checkpoint.save_steps": "1 (a checkpoint after the first step, for the SIGKILL)",
    "train.eval_steps": "off (validation is the eval stage's job here)",
}


# --- measuring a child ------------------------------------------------------------------------------------------


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return total


def run_child(cmd: list[str], log: Path, kill_when=None, env: dict | None = None) -> dict[str, Any]:
    """Run `cmd` (output to `log`), sampling its tree's RSS; `kill_when()` true -> SIGKILL the tree."""
    t0, peak = time.time(), 0
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        killed = False
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            if kill_when is not None and not killed and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.2)
    return {
        "rc": proc.returncode,
        "seconds": round(time.time() - t0, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
        "killed": killed,
    }


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _size(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**30, 2)


# --- the stages ---------------------------------------------------------------------------------------------------


class Rehearsal:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = self.work / "rehearsal.log"
        self.results_file = self.work / "results.json"
        self.results: dict[str, Any] = json.loads(self.results_file.read_text()) if self.results_file.exists() else {}
        self.base = CACHE / "base"
        self.data = self.work / "data"
        self.env = dict(os.environ, SO8T_PROGRESS="0", PYTHONUNBUFFERED="1")

    def save(self) -> None:
        self.results_file.write_text(json.dumps(self.results, indent=1, ensure_ascii=False) + "\n")

    def stage(self, name: str, fn) -> None:
        if name in self.results and name not in self.args.redo and self.results[name].get("ok"):
            print(f">> {name}: done before ({self.results[name].get('seconds')} s), kept", file=sys.stderr)
            return
        if self.args.only and name not in self.args.only:
            return
        print(f">> {name} ...", file=sys.stderr, flush=True)
        try:
            row = fn()
        except Exception as err:  # a stage that fails is a row of the table, not the end of the rehearsal
            row = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        self.results[name] = row
        self.save()
        print(f">> {name}: {json.dumps(row, ensure_ascii=False)[:400]}", file=sys.stderr, flush=True)

    # base: the real configuration, random bf16 weights, the real tokenizer (cached: 7.6 GB written once)
    def do_base(self) -> dict:
        import torch
        from bake_memory import base_tensors
        from transformers import AutoConfig

        from services.baker.weights import SafetensorsStream, TensorPlan, cut_into_shards, shard_names
        from shared import atomic

        marker = self.base / "so8t-rehearsal.json"
        if marker.exists():
            return dict(json.loads(marker.read_text()), ok=True, cached=True, seconds=0)
        t0 = time.time()
        cfg = AutoConfig.from_pretrained(self.args.tokenizer)
        if cfg.model_type != "phi3" or cfg.hidden_size != 3072:
            raise SystemExit(f"{self.args.tokenizer}: its config.json is not Phi-3.5-mini's")
        shutil.rmtree(self.base, ignore_errors=True)
        self.base.mkdir(parents=True)
        g = torch.Generator().manual_seed(0)
        plans = [TensorPlan(n, self.base, s, torch.bfloat16) for n, s in base_tensors(cfg)]
        shards = cut_into_shards(plans, 2 * 2**30)
        names = shard_names(len(shards))
        for plan, fname in zip(shards, names):
            stream = SafetensorsStream(self.base / fname, plan)
            for p in plan:
                t = torch.ones(p.shape) if p.name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
                stream.write(p.name, t.to(torch.bfloat16))
            stream.close()
        index = {p.name: f for plan, f in zip(shards, names) for p in plan}
        total = sum(p.nbytes for p in plans)
        atomic.write_json(
            self.base / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": index}
        )
        d = cfg.to_dict()
        d.pop("auto_map", None)
        d["dtype"] = "bfloat16"
        d["architectures"] = ["Phi3ForCausalLM"]
        atomic.write_json(self.base / "config.json", d)
        atomic.write_json(
            self.base / "generation_config.json",
            {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000},
        )
        copy_tokenizer(self.args.tokenizer, self.base)
        row = {
            "ok": True,
            "seconds": round(time.time() - t0, 1),
            "size_gib": _size(self.base),
            "config": {k: d.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size", "sliding_window")},
            "rope": (d.get("rope_scaling") or d.get("rope_parameters") or {}).get("rope_type", "longrope"),
        }
        atomic.write_json(marker, row)
        return row

    # dataset: the example set plus one record that fills 2048 tokens
    def do_dataset(self) -> dict:
        inp = self.work / "input"
        shutil.rmtree(inp, ignore_errors=True)
        inp.mkdir()
        for f in (REPO / "examples" / "four_class").glob("*.jsonl"):
            shutil.copy(f, inp / f.name)
        long_answer = "光合成は、植物が光のエネルギーを使って二酸化炭素と水から糖を作る仕組みです。" * 90
        rec = {
            "instruction": "光合成について、できるだけ詳しく説明してください。",
            "input": "",
            "output": long_answer,
            "four_class_label": "ALLOW",
            "domain_label": "science",
            "safety_label": "safe",
        }
        (inp / "long.jsonl").write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
        out = self.data / "dataset"
        r = run_child(
            _py("-m", "services.dataset", "--input", str(inp / "*.jsonl"), "--output", str(out)), self.log, env=self.env
        )
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.base)
        lengths = [len(tok(json.loads(line)["text"])["input_ids"]) for line in (out / "train.jsonl").open()]
        return dict(
            r,
            ok=r["rc"] == 0,
            records=len(lengths),
            longest_tokens=max(lengths),
            mean_tokens=round(sum(lengths) / len(lengths)),
        )

    def _profile(self) -> Path:
        import yaml

        cfg = yaml.safe_load((REPO / "configs" / "train" / "full.yaml").read_text())
        cfg["train"].update(grad_accum=1, deterministic=True, eval_steps=None)
        cfg["checkpoint"]["save_steps"] = 1
        path = self.work / "full-rehearsal.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def _train_cmd(self, out: Path) -> list[str]:
        return _py(
            "-m",
            "services.trainer",
            "--config",
            str(self._profile()),
            "--dataset",
            str(self.data / "dataset" / "train.jsonl"),
            "--output-dir",
            str(out),
            "--base-model",
            str(self.base),
            "--max-steps",
            str(self.args.steps),
            "--allow-cpu",
        )

    # train: uninterrupted, then killed after the first checkpoint and restarted; the two must end equal
    def do_train(self) -> dict:
        from safetensors.torch import load_file

        whole, cut = self.data / "train", self.data / "train-killed"
        for d in (whole, cut):
            shutil.rmtree(d, ignore_errors=True)
        a = run_child(self._train_cmd(whole), self.log, env=self.env)
        if a["rc"] != 0:
            return dict(a, ok=False, error="the uninterrupted run failed: see rehearsal.log")
        first = cut / "checkpoints" / "checkpoint-1" / "checkpoint.json"
        b = run_child(self._train_cmd(cut), self.log, kill_when=first.exists, env=self.env)
        c = run_child(self._train_cmd(cut), self.log, env=self.env)
        same = {}
        for name in ("adapter_model.safetensors", "so8t_gates.safetensors"):
            x, y = load_file(str(whole / "final" / name)), load_file(str(cut / "final" / name))
            same[name] = x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)
        m = json.loads((whole / "final" / "manifest.json").read_text())["metrics"]
        return {
            "ok": all(same.values()) and b["killed"] and c["rc"] == 0,
            "seconds": a["seconds"],
            "peak_rss_gib": max(a["peak_rss_gib"], b["peak_rss_gib"], c["peak_rss_gib"]),
            "steps": m["steps"],
            "final_losses": m["final_losses"],
            "killed_after_checkpoint_1": b["killed"],
            "resume_seconds": c["seconds"],
            "resumed_equals_uninterrupted": same,
            "adapter_gib": _size(whole / "final"),
            "checkpoint_gib": _size(whole / "checkpoints" / "checkpoint-1"),
        }

    def do_bake(self) -> dict:
        out = self.data / "baked"
        r = run_child(
            _py(
                "-m",
                "services.baker",
                "--trained",
                str(self.data / "train" / "final"),
                "--output",
                str(out),
                "--dtype",
                "bfloat16",
                "--base",  # the cached base as given: a rehearsal's base may be re-made between its stages
                str(self.base),
            ),
            self.log,
            env=self.env,
        )
        if r["rc"] != 0:
            return dict(r, ok=False, error=_tail(self.log))
        v = json.loads((out / "manifest.json").read_text())["metrics"]["verification"]
        return dict(
            r,
            ok=True,
            size_gib=_size(out),
            max_abs_logit_diff=v["baked_vs_gated"]["max_abs_logit_diff"],
            rounding_alone=(v["dtype_noise_vs_gated"] or {}).get("max_abs_logit_diff"),
            unrotated=v["unrotated_vs_gated"]["max_abs_logit_diff"],
            top1=v["baked_vs_gated"]["top1_agreement"],
        )

    def do_convert(self) -> dict:
        out = self.data / "gguf"
        r = run_child(
            _py(
                "-m",
                "services.converter",
                "--model",
                str(self.data / "baked"),
                "--output-dir",
                str(out),
                "--name",
                "rehearsal",
            ),
            self.log,
            env=self.env,
        )
        if r["rc"] != 0:
            return dict(r, ok=False, error=_tail(self.log))
        m = json.loads((out / "manifest.json").read_text())["metrics"]
        checks = {
            q: f"weights {t['weights']['worst_rel_rms']:.2g}, max|Δ| {t['logits']['max_abs']:.3g} "
            f"(bound {t['bounds']['max_abs']:.3g}), KL {t['logits']['kl_mean']:.3g} (own {t['noise']['kl_mean']:.3g}, "
            f"bound {t['bounds']['kl_mean']:.3g}), top-1 {t['logits']['top1']:.1%}"
            for q, t in m["types"].items()
        }
        sizes = {p.name: round(p.stat().st_size / 2**30, 2) for p in sorted(out.glob("*.gguf"))}
        return dict(r, ok=True, sizes_gib=sizes, checks=checks)

    def do_eval(self) -> dict:
        out = self.data / "eval"
        models = [f"{q}=gguf:{self.data / 'gguf' / f'rehearsal-{q}.gguf'}" for q in ("F16", "Q8_0", "Q4_K_M")]
        cmd = _py(
            "-m",
            "services.eval",
            "--split",
            f"val={self.data / 'dataset' / 'val.jsonl'}",
            "--output",
            str(out),
            "--max-records",
            f"val={self.args.eval_records}",
            "--max-tokens",
            "128",
        )
        for m in models:
            cmd += ["--model", m]
        r = run_child(cmd, self.log, env=self.env)
        if r["rc"] != 0:
            return dict(r, ok=False, error=_tail(self.log))
        report = (out / "report.md").read_text() if (out / "report.md").exists() else ""
        return dict(r, ok=True, table=[line for line in report.splitlines() if line.startswith("|")][:8])

    def do_serve(self) -> dict:
        gguf = self.data / "gguf" / "rehearsal-Q4_K_M.gguf"
        out = self.work / "serve.json"
        out.unlink(missing_ok=True)
        r = run_child(
            _py(str(REPO / "bench" / "_serve_once.py"), "--gguf", str(gguf), "--json", str(out)), self.log, env=self.env
        )
        got = json.loads(out.read_text()) if out.exists() else {}
        # random weights write no /think format: the gate withholding the reply (502 withheld) is the right answer
        served = all(got.get(k) in (200, 502) for k in ("think_status", "chat_status"))
        return dict(r, ok=r["rc"] == 0 and served, **got)

    def _slice(self, layers: int) -> Path:
        """The cached base with only its first `layers` layers (a config change; the shards are linked, not copied)."""
        out = CACHE / f"base-{layers}-layers"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in self.base.iterdir():
            if f.name != "config.json":
                (out / f.name).symlink_to(f)
        cfg = json.loads((self.base / "config.json").read_text())
        cfg["num_hidden_layers"] = layers
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        return out

    def do_twin(self) -> dict:
        """One seq-2048 8-bit step, reentrant vs non-reentrant, on the real width with --twin-layers layers (a full
        32-layer 2048-token step takes ~40 min on 2 busy cores): the difference per layer, and x32."""
        layers = self.args.twin_layers
        model = self.base if layers >= 32 else self._slice(layers)
        rows = {}
        for mode in ("reentrant", "non-reentrant"):
            out = self.work / f"twin-{mode}.json"
            out.unlink(missing_ok=True)
            cmd = _py(
                str(REPO / "bench" / "_fit.py"),
                "--model",
                str(model),
                "--seq",
                "2048",
                "--quant",
                "8bit",
                "--r",
                "64",
                "--gates",
                "all",
                "--checkpointing",
                mode,
                "--json",
                str(out),
            )
            r = run_child(cmd, self.log, env=dict(self.env, CUDA_VISIBLE_DEVICES=""))
            fit = json.loads(out.read_text()) if out.exists() and r["rc"] == 0 else {}
            rows[mode] = dict(
                r, step_s=fit.get("step_s"), child_peak_rss_gib=round(fit.get("peak_rss_mib", 0) / 1024, 2)
            )
        delta = rows["non-reentrant"]["child_peak_rss_gib"] - rows["reentrant"]["child_peak_rss_gib"]
        return {
            "ok": all(v["rc"] == 0 for v in rows.values()),
            "layers": layers,
            **rows,
            "extra_gib_per_layer": round(delta / layers, 3),
            "extra_gib_32_layers": round(delta / layers * 32, 2),
            "seconds": round(sum(v["seconds"] for v in rows.values()), 1),
        }


def copy_tokenizer(source: str, base: Path) -> None:
    """The tokenizer's files as released, the baker's list of a complete tokenizer (a directory or the hub
    repo's): transformers' save_pretrained would drop tokenizer.model."""
    from services.baker.inputs import TOKENIZER_FILES

    src = Path(source)
    if not src.is_dir():
        from huggingface_hub import snapshot_download

        src = Path(snapshot_download(source, allow_patterns=list(TOKENIZER_FILES)))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, base / name)


def _tail(log: Path, n: int = 3) -> str:
    lines = log.read_text(errors="replace").splitlines()
    return " / ".join(lines[-n:])[-600:]


def table(results: dict[str, Any]) -> str:
    head = "| stage | result | wall | peak RSS | artifacts | figures |\n|---|---|--:|--:|---|---|"
    rows = []
    for name in STAGES:
        r = results.get(name)
        if r is None:
            rows.append(f"| {name} | not run | | | | |")
            continue
        ok = "ok" if r.get("ok") else f"FAILED: {r.get('error', '')[:200]}"
        wall = f"{r.get('seconds', 0):.0f} s"
        rss = f"{r['peak_rss_gib']:.1f} GiB" if r.get("peak_rss_gib") else ""
        arts, figs = _describe(name, r)
        rows.append(f"| {name} | {ok} | {wall} | {rss} | {arts} | {figs} |")
    return head + "\n" + "\n".join(rows)


def _describe(name: str, r: dict) -> tuple[str, str]:
    if name == "base":
        c = r.get("config") or {}
        return f"{r.get('size_gib')} GiB bf16", (
            f"hidden {c.get('hidden_size')}, {c.get('num_hidden_layers')} layers, vocabulary {c.get('vocab_size')}, "
            f"sliding window {c.get('sliding_window')}, {r.get('rope')}"
        )
    if name == "dataset":
        return (
            f"{r.get('records')} train records",
            f"longest {r.get('longest_tokens')} tokens, mean {r.get('mean_tokens')}",
        )
    if name == "train":
        losses = r.get("final_losses") or {}
        same = r.get("resumed_equals_uninterrupted") or {}
        return (
            f"adapter+gates {r.get('adapter_gib')} GiB, checkpoint {r.get('checkpoint_gib')} GiB",
            f"{r.get('steps')} steps, LM {losses.get('lm', 0):.3f}, PET {losses.get('pet', 0):.3g}, ortho "
            f"{losses.get('ortho', 0):.1e}; SIGKILL after checkpoint-1, resumed in {r.get('resume_seconds')} s: "
            f"adapter and gates {'bitwise equal' if same and all(same.values()) else 'DIFFERENT'} to the "
            "uninterrupted run",
        )
    if name == "bake":
        return f"{r.get('size_gib')} GiB bf16", (
            f"max|Δlogit| {r.get('max_abs_logit_diff', 0):.3f} "
            f"(bf16 rounding alone {r.get('rounding_alone') or 0:.3f}, "
            f"the un-rotated merge {r.get('unrotated', 0):.2f}), top-1 {r.get('top1', 0):.1%}"
        )
    if name == "convert":
        sizes = ", ".join(f"{f[:-5].rsplit('-', 1)[-1]} {g}" for f, g in r.get("sizes_gib", {}).items())
        return f"{sizes} GiB", "; ".join(f"{q}: {c}" for q, c in r.get("checks", {}).items())
    if name == "eval":  # report rows: model | split | n | format | ... | withheld | leaks | chrF | tok/s | ...
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in r.get("table", [])[2:]]
        return "", "; ".join(
            f"{c[0]}: {c[2]} {c[1]} records, format {c[3]}, withheld {c[10]}, {c[13]} tok/s"
            for c in rows
            if len(c) > 14
        )
    if name == "serve":
        return "", f"/think {r.get('think_status')} {r.get('think_answer', '')[:60]!r}; /v1 {r.get('chat_status')}"
    if name == "twin":
        a, b = r.get("reentrant", {}), r.get("non-reentrant", {})
        return f"{r.get('layers')} of 32 layers", (
            f"seq 2048 8-bit step: reentrant peak RSS {a.get('child_peak_rss_gib')} GiB ({a.get('step_s')} s), "
            f"non-reentrant {b.get('child_peak_rss_gib')} GiB ({b.get('step_s')} s): "
            f"+{r.get('extra_gib_per_layer')} GiB a layer, +{r.get('extra_gib_32_layers')} GiB for 32 layers"
        )
    return "", ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="the real Phi-3.5 tokenizer: a directory or the hub id")
    ap.add_argument("--work", default=str(CACHE / "work"), help="where the run's data and results go")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps of the training runs")
    ap.add_argument("--eval-records", type=int, default=2)
    ap.add_argument("--twin-layers", type=int, default=4, help="layers of the reentrant/non-reentrant twin (32: all)")
    ap.add_argument("--only", nargs="+", choices=STAGES, default=None, help="run only these stages")
    ap.add_argument("--redo", nargs="+", choices=STAGES, default=[], help="run these again even when done")
    args = ap.parse_args()
    r = Rehearsal(args)
    for name in STAGES:
        r.stage(name, getattr(r, f"do_{name}"))
    print(
        f"\nFull-size rehearsal on the CPU ({os.cpu_count()} cores); train: the full profile except "
        + "; ".join(f"{k}: {v}" for k, v in TRAIN_CHANGES.items())
        + "\n"
    )
    print(table(r.results))
    (Path(args.work) / "table.md").write_text(table(r.results) + "\n")


if __name__ == "__main__":
    main()
