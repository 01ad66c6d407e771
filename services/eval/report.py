"""The eval report: one table (report.md, also printed) and one figure (report.png, matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.eval.metrics import GATE_OUTCOMES, PREDICTED
from shared.think_format import LABELS

SAFETY_RATES = ("false_allow", "over_refusal", "escalation_recall")
SAFETY_COLUMNS = ("model", "split", "false allow", "over-refusal", "escalation recall", "inconsistent", "AUC A/E/D/R")
PAIRED_CELLS = ("both_right", "f16_right_model_wrong", "f16_wrong_model_right", "both_wrong")
PAIRED_COLUMNS = (
    "vs F16",
    "split",
    "verdicts agree",
    "both right",
    "F16 right, it wrong",
    "F16 wrong, it right",
    "both wrong",
    "McNemar p",
    "Δ false allow",
)
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


def _table(columns: tuple[str, ...] | list[str], body: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(r) + " |" for r in body),
    ]


def _ci(r: dict[str, Any]) -> str:
    if r["rate"] is None:
        return "– (0)"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}] ({r['k']}/{r['n']})"


def _auc(ls: dict[str, Any] | None) -> str:
    if not ls:
        return "–"
    return " ".join("–" if ls["auc"][lbl] is None else f"{ls['auc'][lbl]:.2f}" for lbl in LABELS)


def safety_rows(figures: dict[str, Any], splits: list[str]) -> list[list[str]]:
    out = []
    for split in splits:
        for model, per in figures["safety"].items():
            f = per.get(split)
            if f is None:
                continue
            ls = figures["label_scores"].get(model, {}).get(split)
            out.append([model, split, *(_ci(f[k]) for k in SAFETY_RATES), str(f["inconsistent"]["total"]), _auc(ls)])
    return out


def paired_rows(figures: dict[str, Any], splits: list[str]) -> list[list[str]]:
    out = []
    for split in splits:
        for model, per in figures["paired"].items():
            p = per.get(split)
            if p is None:
                continue
            t, d = p["table"], p["false_allow_increase"]
            out.append(
                [
                    model,
                    split,
                    _ci(p["verdict_agreement"]),
                    *(str(t[k]) for k in PAIRED_CELLS),
                    f"{p['mcnemar_p']:.3g}",
                    "–" if d is None else f"{100 * d:+.0f} pts",
                ]
            )
    return out


def markdown(
    results: dict[str, dict[str, Any]], failed: dict[str, str], splits: list[str], figures: dict[str, Any]
) -> str:
    lines = _table(COLUMNS, rows(results, splits))
    lines += [f"| {m} | failed: {why} |" for m, why in failed.items()]
    lines += ["", *_table(SAFETY_COLUMNS, safety_rows(figures, splits))]
    if figures["paired"]:
        lines += ["", *_table(PAIRED_COLUMNS, paired_rows(figures, splits))]
    verdicts = figures["acceptance"]
    mode = figures["acceptance_policy"]["on_fail"]
    body = [
        [m, "pass" if a["passed"] else f"FAIL ({mode})", "; ".join(a["reasons"]) or "–"] for m, a in verdicts.items()
    ]
    lines += ["", *_table(("model", "acceptance", "why"), body), ""]
    lines.append(
        "format: the shared parser accepts the reply; verdict: its thinking has a verdict line; label acc: "
        "the verdict equals the record's four-class label; answered … withheld: what POST /think returns; "
        "leaks: thinking text in what it returns; chrF: final part vs the reference answer; tokens: mean "
        "reply length. false allow: DENY/REFUSE records given an ALLOW verdict; over-refusal: ALLOW records given "
        "DENY/REFUSE; [95% Wilson interval] (k/n); inconsistent: verdict and final part disagree; AUC: per-label "
        "ROC AUC of the label scores (ALLOW ESCALATION DENY REFUSE). Paired: the same records as the F16; "
        "right/wrong: the verdict vs the label; McNemar: exact p-value of the discordant pairs; Δ false allow: "
        "percentage points above the F16's."
    )
    return "\n".join(lines) + "\n"


def _bars(ax, results: dict[str, dict[str, Any]], split: str) -> None:
    models = list(results)
    x = range(len(models))
    for shift, key, name in ((-0.2, "format_compliance", "format"), (0.2, "label_accuracy", "label acc")):
        ax.bar([k + shift for k in x], [results[m]["splits"][split][key] or 0 for m in models], 0.4, label=name)
    ax.set_xticks(list(x), models, rotation=30, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"{split}", fontsize=9)
    ax.legend(fontsize=7)


def _rates(ax, figures: dict[str, Any], split: str) -> None:
    """False allow and over-refusal per model, the 95% Wilson interval as the error bar."""
    models = [m for m, per in figures["safety"].items() if split in per]
    for shift, key, name in ((-0.2, "false_allow", "false allow"), (0.2, "over_refusal", "over-refusal")):
        rs = [figures["safety"][m][split][key] for m in models]
        mid = [r["rate"] or 0 for r in rs]
        err = [
            [m - (r["ci95"] or [0, 0])[0] for m, r in zip(mid, rs)],
            [(r["ci95"] or [0, 0])[1] - m for m, r in zip(mid, rs)],
        ]
        ax.bar([k + shift for k in range(len(models))], mid, 0.4, yerr=err, capsize=3, label=name)
    ax.set_xticks(list(range(len(models))), models, rotation=30, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(f"{split}: safety errors, 95% CI", fontsize=9)
    ax.legend(fontsize=7)


def _confusion(ax, c: dict[str, dict[str, int]], title: str) -> None:
    grid = [[c[ref][pred] for pred in PREDICTED] for ref in LABELS]
    ax.imshow(grid, cmap="Blues")
    for r, row in enumerate(grid):
        for k, v in enumerate(row):
            ax.text(k, r, str(v), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(PREDICTED)), [p[:4] for p in PREDICTED], fontsize=6)
    ax.set_yticks(range(len(LABELS)), [lbl[:4] for lbl in LABELS], fontsize=6)
    ax.set_title(title, fontsize=8)


def figure(
    results: dict[str, dict[str, Any]], failed: dict[str, str], splits: list[str], path: Path, figures: dict[str, Any]
) -> None:
    """Per split: bars of format compliance and label accuracy per model, the safety error rates with their
    intervals, and each model's confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    cols = 2 + max(len(models), 1)
    fig, axes = plt.subplots(len(splits), cols, figsize=(3.2 * cols, 3.0 * len(splits)), squeeze=False)
    for i, split in enumerate(splits):
        _bars(axes[i][0], results, split)
        _rates(axes[i][1], figures, split)
        for j, m in enumerate(models, start=2):
            _confusion(axes[i][j], results[m]["splits"][split]["confusion"], f"{m} ({split}): label × verdict")
        for j in range(len(models) + 2, cols):
            axes[i][j].axis("off")
    if failed:
        fig.suptitle("failed: " + ", ".join(failed), fontsize=8, color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
