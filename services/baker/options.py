"""The baker's options, declared once (CLI flags and the pipeline profile's `bake:` come from here)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.config import StrictModel

BakeDtype = Literal["bfloat16", "float16", "float32"]


class BakeOptions(StrictModel):
    """When a bake passes: float32 has fixed bounds (the bake differs only by summation order); for bfloat16 and
    float16 the bake may differ by rounding, so the bounds add `noise_margin` × what rounding the reference's
    weights to that dtype costs (measured on the same prompts). A wrong or missing fold moves the logits by about
    the un-rotated merge's distance, far beyond either bound unless the gates are near the identity."""

    dtype: BakeDtype = Field("bfloat16", description="saved weight dtype; merge and fold always run in float32")
    max_shard_gb: float = Field(2.0, gt=0, description="safetensors shard size limit in GiB")
    max_logit_diff: float = Field(
        1e-3, gt=0, description="float32 bound on max |logit difference| vs the trained model"
    )
    max_kl: float = Field(1e-6, gt=0, description="float32 bound on the mean KL vs the trained model")
    noise_margin: float = Field(
        4.0, ge=1, description="bfloat16/float16: allowed multiple of what rounding to that dtype alone costs"
    )

    def bounds(self, noise: dict[str, float] | None) -> dict[str, float]:
        """The bounds of a bake, given what dtype rounding alone costs (None for float32)."""
        if noise is None:
            return {"max_abs_logit_diff": self.max_logit_diff, "kl_mean": self.max_kl}
        return {
            "max_abs_logit_diff": self.max_logit_diff + self.noise_margin * noise["max_abs_logit_diff"],
            "kl_mean": self.max_kl + self.noise_margin * noise["kl_mean"],
        }
