"""Prompt lookup: propose the tokens that followed the last time the sequence's tail appeared.

Code edits, summaries and quotes repeat their input: when the last `n` tokens occurred before
(in the prompt or the output), the tokens that came after them then are a cheap guess for what
comes next. The longest tail from `prompt_lookup_max` down to `prompt_lookup_min` that has an
earlier occurrence wins; of its occurrences, the latest. The proposal copies on with the match's
period: after a run "x x x x" the latest match of "x x x" is one token back, and the tokens
after it (the tail itself, then the proposals so far) still say "x x x".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def lookup(tokens: Sequence[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens following the latest earlier occurrence of the longest tail of
    `tokens` of `min_n` .. `max_n` tokens; [] when no tail occurred before."""
    if k <= 0 or len(tokens) < min_n + 1:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    length = len(seq)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows that start early enough to have a token after them: never the tail itself.
        windows = sliding_window_view(seq[: length - 1], n)
        hits = np.flatnonzero((windows == seq[length - n :]).all(axis=1))
        if hits.size:
            period = length - n - int(hits[-1])
            out = seq.tolist()
            for _ in range(k):
                out.append(out[-period])
            return out[length:]
    return []
