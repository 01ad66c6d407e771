"""The chain, described once: which stages run in what order, each one's command, what it waits for, what it writes.

`so8t pipeline` runs these commands natively one after the other (services/pipeline/run.py); in the compose stack
every stage container runs `python -m services.stack --config configs/pipeline/<profile>.yaml <stage>`, which takes
its command and its upstream from here. Paths come from shared.layout, settings from the profile: nothing else
spells a stage's command line. Kept free of heavy imports (it runs in every image).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from services.converter.options import ConvertOptions
from services.dataset.options import DatasetOptions
from services.eval.options import EvalOptions
from services.pipeline.config import PipelineConfig
from services.tiny_model.options import TinyOptions
from services.trainer.options import TrainOptions
from shared import flags
from shared.errors import InputError
from shared.layout import Layout, ollama_tag

TINY = "tiny"  # train.base_model value for the tiny random Phi-3 (built once under <data>/models/tiny)


@dataclass(frozen=True)
class Stage:
    name: str
    commands: tuple[tuple[str, ...], ...]  # run one after the other; the stage fails at the first that fails
    output: Path | None  # the directory whose manifest.json proves the stage ran
    after: tuple[str, ...] = ()  # upstream stages, done first
    needs_ollama: bool = False  # natively, only run when an Ollama server answers


def _py(module: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", module, *args)


def trainer(args: list[str], gpus: str | None = None) -> tuple[str, ...]:
    """The trainer's command: under torchrun (DDP, one process per GPU) when given more than one GPU.

    `gpus`: $SO8T_GPUS by default, the count compose reserves for the trainer ("all": every GPU the container sees).
    """
    gpus = (gpus if gpus is not None else os.environ.get("SO8T_GPUS", "1")).strip().lower() or "1"
    if gpus == "all":
        per_node = "gpu"  # torchrun's own: one process per visible GPU
    elif gpus.isdigit() and int(gpus) >= 1:
        per_node = gpus
    else:
        raise InputError(f"SO8T_GPUS={gpus!r}: expected a number of GPUs (1, 2, ...) or 'all'")
    if per_node == "1":
        return _py("services.trainer", *args)
    return _py("torch.distributed.run", "--standalone", f"--nproc-per-node={per_node}", "-m", "services.trainer", *args)


def base_model(cfg: PipelineConfig, layout: Layout) -> str:
    """The trainer's base: a hub id or directory, or the tiny model's directory on the data volume."""
    return str(layout.tiny_model) if cfg.train.base_model == TINY else cfg.train.base_model


def _each(flag: str, values: list[str]) -> list[str]:
    return [arg for v in values for arg in (flag, v)]


def plan(cfg: PipelineConfig, layout: Layout) -> list[Stage]:
    """Every stage of the chain, in order."""
    run, ds, base = layout.run(cfg.run_id), layout.dataset(cfg.dataset.id), base_model(cfg, layout)
    d, t, c, e, o = cfg.dataset, cfg.train, cfg.convert, cfg.eval, cfg.ollama
    ggufs = {qtype: str(run.gguf_file(c.name, qtype)) for qtype in c.types}

    dataset = [*_each("--input", d.inputs or [str(layout.input_glob)]), "--output", str(ds)]
    dataset += flags.to_argv(d, DatasetOptions)
    train = ["--config", t.config, "--dataset", str(ds / "train.jsonl"), "--output-dir", str(run.train)]
    train += flags.to_argv(t.model_copy(update={"base_model": base}), TrainOptions)
    bake = ["--trained", str(run.final), "--output", str(run.baked), *flags.to_argv(cfg.bake)]
    convert = ["--model", str(run.baked), "--output-dir", str(run.gguf), "--name", c.name]
    convert += flags.to_argv(c, ConvertOptions)
    probe_ds = layout.dataset(f"{d.id}-probe")  # the probe set built like the dataset, every record in train.jsonl
    probe = [*_each("--input", e.probe), "--output", str(probe_ds)]
    probe += flags.to_argv(d.model_copy(update={"val_ratio": 0.0}), DatasetOptions)
    probe_build = (_py("services.dataset", *probe),) if "probe" in e.splits else ()
    models = {"base": f"hf:{base}", "baked": f"hf:{run.baked}"} | {q: f"gguf:{f}" for q, f in ggufs.items()}
    split_files = {split: ds / f"{split}.jsonl" for split in ("val", "train")} | {"probe": probe_ds / "train.jsonl"}
    evaluate = _each("--split", [f"{split}={split_files[split]}" for split in e.splits])
    evaluate += _each("--model", [f"{m}={models[m]}" for m in e.models if m in models])
    evaluate += ["--output", str(run.eval), *flags.to_argv(e, EvalOptions)]
    evaluate += ["--acceptance", e.acceptance.model_dump_json()]
    accept = ["--eval-dir", str(run.eval), *_each("--model", list(ggufs))]  # no import of a quant that failed it
    ollama = ["import", "--gguf", *ggufs.values(), "--model", o.model, "--run-dir", str(run.ollama)]
    ollama += ["--format", d.format]
    smoke = ["smoke", "--model", f"{o.model}:{ollama_tag(cfg.serve.gguf_type)}", "--output", str(run.ollama)]

    tiny = ["--output", base, "--pretrain-on", str(ds / "train.jsonl"), *flags.to_argv(cfg.tiny, TinyOptions)]

    stages = [Stage("dataset", (_py("services.dataset", *dataset),), ds)]
    if t.base_model == TINY:  # the demo's base, pre-trained on the train split (services/tiny_model/pretrain.py)
        stages.append(Stage("tiny-model", (_py("services.tiny_model", *tiny),), Path(base), ("dataset",)))
    stages += [
        Stage("train", (trainer(train),), run.final, (stages[-1].name,)),
        Stage("bake", (_py("services.baker", *bake),), run.baked, ("train",)),
        Stage("convert", (_py("services.converter", *convert),), run.gguf, ("bake",)),
        Stage("eval", (*probe_build, _py("services.eval", *evaluate)), run.eval, ("convert",)),
        Stage(
            "ollama-import",
            (_py("services.acceptance", *accept), _py("services.ollama", *ollama)),
            None,
            ("eval",),
            needs_ollama=True,
        ),
        Stage("ollama-smoke", (_py("services.ollama", *smoke),), None, ("ollama-import",), needs_ollama=True),
    ]
    return stages


def serve_command(cfg: PipelineConfig, layout: Layout, backend: str = "ollama") -> tuple[str, ...]:
    """`so8t serve` for what the chain made: the Ollama tag (or, with llamacpp, the GGUF; with openai, the name
    llama-server serves the GGUF under) of `serve.gguf_type`."""
    qtype = cfg.serve.gguf_type
    gguf = layout.run(cfg.run_id).gguf_file(cfg.convert.name, qtype)
    model = {"ollama": f"{cfg.ollama.model}:{ollama_tag(qtype)}", "openai": gguf.name}.get(backend, str(gguf))
    return _py("services.think_api", "--backend", backend, "--model", model, "--format", cfg.dataset.format)


def engine_command(cfg: PipelineConfig, layout: Layout) -> tuple[str, ...]:
    """llama.cpp's `llama-server` on the GGUF of `serve.gguf_type`, served under its file name (what
    `serve_command(..., "openai")` asks for); host, port and slots are the caller's."""
    gguf = layout.run(cfg.run_id).gguf_file(cfg.convert.name, cfg.serve.gguf_type)
    return ("llama-server", "--model", str(gguf), "--alias", gguf.name)


def stage(stages: list[Stage], name: str) -> Stage:
    for s in stages:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r} in the chain; stages: {', '.join(s.name for s in stages)}")
