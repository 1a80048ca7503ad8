"""``process_results`` of the ``wiki_long`` task: per-token perplexity over every row, and over the late rows only.

lm-eval's own loglikelihood metrics average per document; a perplexity must pool log-likelihoods and token counts
(``weighted_perplexity``: ``exp(-sum ll / sum n)``). A row that is not late adds ``(0, 0)`` to the late sums.
"""

from __future__ import annotations

from typing import Any


def process_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    ll = float(results[0][0])
    n = int(doc["n_tokens"])
    return {"token_perplexity": (ll, n), "token_perplexity_late": (ll, n) if doc["late"] else (0.0, 0)}
