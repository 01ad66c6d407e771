"""The HF model with a GGUF's own weights: what the file's rounding alone does to each tensor and to the logits.

Every parameter of the baked model is matched to its GGUF tensor through gguf-py's name map (the one
convert_hf_to_gguf.py writes with), dequantised by gguf-py, compared with the HF tensor (relative RMS error) and
copied into the model; one float32 forward on the check conversation then gives "HF with the file's weights".
Its distance from the HF reference is what the rounding costs this very model (deep random-weight models amplify
it, trained ones barely do), and the logit bounds widen by a margin of it (options.Thresholds.bounds). When every
tensor is bitwise the HF one (the F16 of a bfloat16 bake) the forward is skipped. The model is freed before the
caller loads the file in llama.cpp, so an HF model and a GGUF never sit in memory together.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from services.converter import reference
from shared import logs

log = logs.get("convert")


@dataclass
class Rounded:
    logits: np.ndarray  # HF float32 forward with the file's dequantised weights
    errors: dict[str, float]  # HF parameter -> relative RMS error of the file's tensor
    problems: list[str]  # parameters the file lacks or holds in another shape
    exact: bool  # every tensor bitwise equal: the logits are the reference's

    def summary(self) -> dict[str, Any]:
        worst = max(self.errors, key=self.errors.__getitem__, default=None)
        return {
            "tensors": len(self.errors),
            "exact": self.exact,
            "worst_tensor": worst,
            "worst_rel_rms": self.errors[worst] if worst else None,
            "median_rel_rms": float(np.median(list(self.errors.values()))) if self.errors else None,
        }


def _rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.sqrt(np.mean(np.square(got - want, dtype=np.float64))))
    scale = float(np.sqrt(np.mean(np.square(want, dtype=np.float64))))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def compute(path: str | Path, ref: reference.Reference, threads: int | None = None) -> Rounded:
    """Load the HF model of `ref`, put the GGUF's dequantised tensors in it, compare, and take its logits."""
    import torch

    t0 = time.time()
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, ref.layers)
    errors: dict[str, float] = {}
    problems: list[str] = []
    with reference.torch_threads(threads):
        model = reference.load_model(ref.model_dir)
        with torch.no_grad():
            for name, param in model.named_parameters():
                gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
                t = tensors.get(gname) if gname else None
                if t is None:
                    problems.append(f"{name}: no tensor {gname or '(unmapped)'} in the file")
                    continue
                got = gguf.quants.dequantize(t.data, t.tensor_type)
                want = param.detach().numpy()
                if got.size != want.size:
                    problems.append(f"{name}: {gname} holds {got.size} values, HF {want.size}")
                    continue
                got = np.array(got, dtype=np.float32).reshape(want.shape)  # a copy: F32 tensors are the mmap
                errors[name] = _rel_rms(got, want)
                param.copy_(torch.from_numpy(got))
        exact = not problems and all(e == 0 for e in errors.values())
        out = ref.logits if exact or problems else reference.logits(model, ref.text_ids)
        del model, reader, tensors
        gc.collect()
    log.info(
        "%s: %d tensors dequantised into HF%s, %.1f s",
        Path(path).name,
        len(errors),
        " (bitwise the HF weights)" if exact else "",
        time.time() - t0,
    )
    return Rounded(out, errors, problems, exact)
