"""The prototype's thinking-quality score, kept as an optional filter: logical connectives, depth, diversity.

score = 0.4·connectives + 0.3·depth + 0.3·diversity, each in [0, 1]:
- connectives: distinct logical connectives used (ja and en), 3 or more scores 1;
- depth: non-empty lines/sentences of reasoning, 6 or more scores 1;
- diversity: distinct character bigrams / all bigrams (repetitive text scores low).
"""

from __future__ import annotations

import re

CONNECTIVES = (
    "なぜなら",
    "したがって",
    "そのため",
    "ただし",
    "しかし",
    "つまり",
    "一方",
    "ため",
    "ので",
    "よって",
    "まず",
    "次に",
    "because",
    "therefore",
    "so ",
    "however",
    "but ",
    "since",
    "thus",
    "first",
    "then",
    "hence",
)
_SENTENCE = re.compile(r"[^。.!?！？\n]+")


def score(thinking: str) -> float:
    text = thinking.lower()
    if not text.strip():
        return 0.0
    connectives = min(1.0, sum(c in text for c in CONNECTIVES) / 3)
    depth = min(1.0, len([s for s in _SENTENCE.findall(text) if s.strip()]) / 6)
    pairs = len(text) - 1
    diversity = len(set(map(str.__add__, text, text[1:]))) / pairs if pairs > 0 else 0.0
    return round(0.4 * connectives + 0.3 * depth + 0.3 * diversity, 4)
