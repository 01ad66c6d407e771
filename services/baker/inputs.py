"""What a bake reads, all validated before anything is written: the trained artifact (LoRA adapter, SO(8) gates,
manifest), the base model it was trained on (config, safetensors weights, tokenizer).

Every problem is a `BakeInputError` whose message names the file at fault. Only small things are loaded here
(configs, safetensors headers, the adapter and the gates); base weights are read tensor by tensor by the writer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.trainer.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, GATES
from shared import phi3
from shared.errors import InputError
from shared.manifest import MANIFEST
from shared.so8 import BLOCK

# The complete Phi-3.5 tokenizer, as Microsoft ships it; copied verbatim into the baked model.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
OPTIONAL_TOKENIZER_FILES = ("chat_template.jinja",)
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# what a hub download of the base needs (the trainer's download usually already put it in the HF cache)
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    WEIGHTS_INDEX,
    *TOKENIZER_FILES,
    *OPTIONAL_TOKENIZER_FILES,
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# adapter_config options that change what a merge means; the baker supports only their neutral values
_UNSUPPORTED = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
}


class BakeInputError(InputError, ValueError):
    """An input of the bake is missing, malformed, or does not belong with the others (message names the file)."""


@dataclass
class LoraDelta:
    """One LoRA pair for base weight W [out, in]: the merge adds scaling · B @ A."""

    A: Any  # torch.Tensor [r, in]
    B: Any  # torch.Tensor [out, r]
    scaling: float


@dataclass
class BaseModel:
    name: str  # as given (hub id or path)
    path: Path  # local directory
    config: dict[str, Any]
    weights: dict[str, Path]  # tensor name -> safetensors file holding it
    shapes: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, ST dtype)

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"


@dataclass
class BakeInputs:
    trained: Path
    train_manifest: dict[str, Any]
    base: BaseModel
    base_overridden: bool
    lora: dict[str, LoraDelta]  # base tensor name -> delta
    lora_config: dict[str, Any]
    gates: dict[int, Any]  # layer index -> A [k, 8, 8] float32


def o_proj_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.o_proj.weight"


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise BakeInputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BakeInputError(f"{path}:{err.lineno}:{err.colno}: {what} is not valid JSON ({err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise BakeInputError(f"{path}: cannot read {what} ({err})") from None


def load(trained: str | Path, base_override: str | None = None) -> BakeInputs:
    """Read and cross-check everything a bake needs; raises BakeInputError before anything is written."""
    trained = Path(trained)
    if not trained.is_dir():
        raise BakeInputError(f"{trained}: trained artifact directory not found (expected <run>/train/final)")
    manifest = _train_manifest(trained)
    name = base_override or manifest["base_model"]
    origin = "--base" if base_override else f"{trained / MANIFEST}: base_model"
    base = read_base(name, resolve_base(name, origin))
    gates = _load_gates(trained, manifest, base)
    lora, lora_config = _load_adapter(trained, base)
    return BakeInputs(trained, manifest, base, base_override is not None, lora, lora_config, gates)


def _train_manifest(trained: Path) -> dict[str, Any]:
    path = trained / MANIFEST
    m = read_json(path, "trained manifest (written last by the trainer: is the run finished?)")
    if not isinstance(m, dict) or m.get("stage") != "train":
        raise BakeInputError(f"{path}: not a trainer manifest (stage={m.get('stage') if isinstance(m, dict) else m!r})")
    if not isinstance(m.get("base_model"), str) or not m["base_model"]:
        raise BakeInputError(f"{path}: base_model: missing; the trainer records the base model it was trained on")
    return m


def resolve_base(name: str, origin: str) -> Path:
    """A local directory as is; a hub id through the HF cache (downloads only what the bake reads)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if p.exists() or not _HUB_ID.fullmatch(name):
        raise BakeInputError(f"{origin}: base model {name!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, gated repo: say which and why
        raise BakeInputError(
            f"{origin}: base model {name!r} is not a local directory and could not be fetched "
            f"from the hub into the HF cache ({type(err).__name__}: {err})"
        ) from None


def read_base(name: str, path: Path) -> BaseModel:
    cfg_path = path / "config.json"
    cfg = read_json(cfg_path, "base model config")
    if cfg.get("model_type") != "phi3":
        raise BakeInputError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}; the baker bakes Phi-3 models only")
    if cfg.get("quantization_config"):
        raise BakeInputError(f"{cfg_path}: the base is a quantized checkpoint; baking needs full-precision weights")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise BakeInputError(f"{cfg_path}: {key}: missing or not a positive integer")
    if cfg["hidden_size"] % BLOCK:
        raise BakeInputError(f"{cfg_path}: hidden_size {cfg['hidden_size']} is not a multiple of {BLOCK}")
    base = BaseModel(name, path, cfg, _weight_files(path))
    base.shapes = _tensor_shapes(base.weights)
    missing = [o_proj_key(i) for i in range(cfg["num_hidden_layers"]) if o_proj_key(i) not in base.shapes]
    if missing:
        raise BakeInputError(
            f"{path}: weights lack {missing[0]} (num_hidden_layers={cfg['num_hidden_layers']} in "
            f"{cfg_path}): incomplete or non-Phi-3 checkpoint"
        )
    check_tokenizer(path)
    return base


def _weight_files(path: Path) -> dict[str, Path]:
    index = path / WEIGHTS_INDEX
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BakeInputError(f"{index}: weight_map missing or empty")
        files = {}
        for tensor, shard in weight_map.items():
            if not (path / shard).is_file():
                raise BakeInputError(f"{index}: {tensor} lives in {shard}, which does not exist")
            files[tensor] = path / shard
        return files
    single = path / SINGLE_WEIGHTS
    if single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {k: single for k in f.keys()}
        except Exception as err:
            raise BakeInputError(f"{single}: unreadable safetensors file ({err})") from None
    raise BakeInputError(
        f"{path}: no safetensors weights ({SINGLE_WEIGHTS} or {WEIGHTS_INDEX}); "
        "PyTorch .bin checkpoints are not supported"
    )


def _tensor_shapes(weights: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in weights.items():
        by_file.setdefault(f, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise BakeInputError(f"{path}: the index says it holds {name}, but it does not")
                    s = f.get_slice(name)
                    shapes[name] = (tuple(s.get_shape()), s.get_dtype())
        except BakeInputError:
            raise
        except Exception as err:
            raise BakeInputError(f"{path}: unreadable safetensors file ({err})") from None
    return shapes


def check_tokenizer(path: Path) -> None:
    """The complete tokenizer must be there, chat template included (the baked model is copied from it)."""
    for name in TOKENIZER_FILES:
        if not (path / name).is_file():
            raise BakeInputError(
                f"{path / name}: tokenizer file missing from the base model; the baked model "
                f"needs the complete tokenizer ({', '.join(TOKENIZER_FILES)})"
            )
    tc = read_json(path / "tokenizer_config.json", "tokenizer config")
    if not tc.get("chat_template") and not (path / "chat_template.jinja").is_file():
        raise BakeInputError(f"{path / 'tokenizer_config.json'}: no chat_template (and no chat_template.jinja)")


def _load_gates(trained: Path, manifest: dict[str, Any], base: BaseModel) -> dict[int, Any]:
    from shared.so8 import load_gates

    path = trained / GATES
    try:
        gates, meta = load_gates(path)
    except (FileNotFoundError, ValueError) as err:
        raise BakeInputError(f"{err} (the trainer saves the SO(8) gates there; PEFT's adapter save does not)") from None
    hidden, layers = base.config["hidden_size"], base.config["num_hidden_layers"]
    where = f"the base model ({base.config_file})"
    if meta.get("hidden_size") != str(hidden):
        raise BakeInputError(
            f"{path}: gates were trained for hidden size {meta.get('hidden_size')} but {where} has "
            f"hidden_size {hidden}: wrong base model?"
        )
    if not gates:
        raise BakeInputError(f"{path}: holds no gated layer")
    for i, A in sorted(gates.items()):
        if i >= layers:
            raise BakeInputError(f"{path}: gate for layer {i} but {where} has {layers} layers: wrong base model?")
        if A.shape[0] * BLOCK != hidden:
            raise BakeInputError(f"{path}: layers.{i}.A covers {A.shape[0] * BLOCK} features, hidden size is {hidden}")
        if not bool(A.isfinite().all()):
            raise BakeInputError(f"{path}: layers.{i}.A contains NaN or Inf")
    listed = (manifest.get("gates") or {}).get("layer_indices")
    if isinstance(listed, list) and sorted(listed) != sorted(gates):
        raise BakeInputError(
            f"{trained / MANIFEST}: gates.layer_indices {sorted(listed)} do not match the layers "
            f"in {path} ({sorted(gates)})"
        )
    return gates


def _load_adapter(trained: Path, base: BaseModel) -> tuple[dict[str, LoraDelta], dict[str, Any]]:
    cfg_path, w_path = trained / ADAPTER_CONFIG, trained / ADAPTER_WEIGHTS
    cfg = read_json(cfg_path, "LoRA adapter config")
    if cfg.get("peft_type") != "LORA":
        raise BakeInputError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters can be baked")
    arch = (cfg.get("auto_mapping") or {}).get("base_model_class")
    if arch and arch != "Phi3ForCausalLM":
        raise BakeInputError(f"{cfg_path}: adapter was made for {arch}, not Phi3ForCausalLM")
    targets = cfg.get("target_modules")
    names = [targets] if isinstance(targets, str) else list(targets or [])
    foreign = [t for t in names if t not in phi3.LORA_TARGETS]
    if not names or foreign:
        raise BakeInputError(
            f"{cfg_path}: target_modules {names} are not Phi-3 modules (expected among "
            f"{', '.join(phi3.LORA_TARGETS)}): an adapter for another architecture?"
        )
    for key, neutral in _UNSUPPORTED.items():
        if cfg.get(key, neutral) not in (neutral, None, {}, [], False):
            raise BakeInputError(f"{cfg_path}: {key}={cfg[key]!r} is not supported by the baker")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise BakeInputError(f"{cfg_path}: r / lora_alpha missing or invalid (r={r!r}, lora_alpha={alpha!r})")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs = _read_adapter_tensors(w_path)
    lora: dict[str, LoraDelta] = {}
    for module, ab in sorted(pairs.items()):
        target = f"{module}.weight"
        if "A" not in ab or "B" not in ab:
            raise BakeInputError(f"{w_path}: {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        if module.rsplit(".", 1)[-1] not in phi3.LORA_TARGETS or target not in base.shapes:
            raise BakeInputError(
                f"{w_path}: LoRA on {module}, which the base model ({base.path}) does not have: "
                "an adapter for another architecture?"
            )
        A, B = ab["A"], ab["B"]
        out_f, in_f = base.shapes[target][0]
        if A.ndim != 2 or B.ndim != 2 or A.shape != (r, in_f) or B.shape != (out_f, r):
            raise BakeInputError(
                f"{w_path}: {module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                f"the base weight [{out_f}, {in_f}] with r={r}: adapter for another model size?"
            )
        if not (bool(A.isfinite().all()) and bool(B.isfinite().all())):
            raise BakeInputError(f"{w_path}: {module}: LoRA weights contain NaN or Inf")
        lora[target] = LoraDelta(A.float(), B.float(), scaling)
    info = {
        "r": r,
        "alpha": alpha,
        "use_rslora": bool(cfg.get("use_rslora")),
        "scaling": scaling,
        "target_modules": sorted(names),
        "modules": len(lora),
    }
    return lora, info


def _read_adapter_tensors(path: Path) -> dict[str, dict[str, Any]]:
    from safetensors import safe_open

    if not path.is_file():
        raise BakeInputError(f"{path}: LoRA adapter weights not found")
    pairs: dict[str, dict[str, Any]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                m = _LORA_KEY.match(key)
                if not m:
                    raise BakeInputError(f"{path}: unexpected tensor {key!r} (only LoRA A/B pairs can be baked)")
                pairs.setdefault(m["module"], {})[m["ab"]] = f.get_tensor(key)
    except BakeInputError:
        raise
    except Exception as err:
        raise BakeInputError(f"{path}: unreadable safetensors file ({err})") from None
    if not pairs:
        raise BakeInputError(f"{path}: holds no LoRA weights")
    return pairs
