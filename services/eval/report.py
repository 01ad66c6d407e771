"""The eval report: one table (report.md, also printed) and one figure (report.png, matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.eval.metrics import GATE_OUTCOMES, PREDICTED
from shared.think_format import LABELS

COLUMNS = ("model", "split", "n", "format", "verdict", "label acc", *GATE_OUTCOMES, "leaks", "chrF", "tok/s", "tokens")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def rows(results: dict[str, dict[str, Any]], splits: list[str]) -> list[list[str]]:
    out = []
    for split in splits:
        for model, r in results.items():
            f = r["splits"][split]
            out.append(
                [
                    model,
                    split,
                    str(f["records"]),
                    _pct(f["format_compliance"]),
                    _pct(f["verdict_present"]),
                    _pct(f["label_accuracy"]),
                    *(str(f["gate"][k]) for k in GATE_OUTCOMES),
                    str(f["leaks"]),
                    f"{f['chrf']:.1f}" if f["chrf"] is not None else "–",
                    f"{f['tokens_per_s']:.0f}" if f["tokens_per_s"] else "–",
                    f"{f['mean_reply_tokens']:.0f}",
                ]
            )
    return out


def markdown(results: dict[str, dict[str, Any]], failed: dict[str, str], splits: list[str]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(results, splits)]
    lines += [f"| {m} | failed: {why} |" for m, why in failed.items()]
    lines.append("")
    lines.append(
        "format: the shared parser accepts the reply; verdict: its thinking has a verdict line; label acc: "
        "the verdict equals the record's four-class label; answered … withheld: what POST /think returns; "
        "leaks: thinking text in what it returns; chrF: final part vs the reference answer; tokens: mean "
        "reply length."
    )
    return "\n".join(lines) + "\n"


def figure(results: dict[str, dict[str, Any]], failed: dict[str, str], splits: list[str], path: Path) -> None:
    """Per split: bars of format compliance and label accuracy per model, and each model's confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    cols = 1 + max(len(models), 1)
    fig, axes = plt.subplots(len(splits), cols, figsize=(3.2 * cols, 3.0 * len(splits)), squeeze=False)
    for i, split in enumerate(splits):
        ax = axes[i][0]
        x = range(len(models))
        ax.bar(
            [k - 0.2 for k in x],
            [results[m]["splits"][split]["format_compliance"] or 0 for m in models],
            0.4,
            label="format",
        )
        ax.bar(
            [k + 0.2 for k in x],
            [results[m]["splits"][split]["label_accuracy"] or 0 for m in models],
            0.4,
            label="label acc",
        )
        ax.set_xticks(list(x), models, rotation=30, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{split}", fontsize=9)
        ax.legend(fontsize=7)
        for j, m in enumerate(models, start=1):
            c = results[m]["splits"][split]["confusion"]
            grid = [[c[ref][pred] for pred in PREDICTED] for ref in LABELS]
            axes[i][j].imshow(grid, cmap="Blues")
            for r, row in enumerate(grid):
                for k, v in enumerate(row):
                    axes[i][j].text(k, r, str(v), ha="center", va="center", fontsize=7)
            axes[i][j].set_xticks(range(len(PREDICTED)), [p[:4] for p in PREDICTED], fontsize=6)
            axes[i][j].set_yticks(range(len(LABELS)), [lbl[:4] for lbl in LABELS], fontsize=6)
            axes[i][j].set_title(f"{m} ({split}): label × verdict", fontsize=8)
        for j in range(len(models) + 1, cols):
            axes[i][j].axis("off")
    if failed:
        fig.suptitle("failed: " + ", ".join(failed), fontsize=8, color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
