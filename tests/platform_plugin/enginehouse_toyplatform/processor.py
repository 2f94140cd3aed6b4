"""`toy_ban`: a logits processor that bans the token ids a request lists.

A request asks for it with `GenerationConfig(logits_processors=["toy_ban"],
extra_args={"toy_ban": [ids]})` (on the server: `"logits_processors": ["toy_ban"],
"vllm_xargs": {"toy_ban": [ids]}`). It keeps each request's ids from `update_state` until the
request finishes, and sets only its requests' rows.
"""

from __future__ import annotations

import torch

from enginehouse.plugin_api import BatchUpdate, LogitsProcessor


class ToyBanProcessor(LogitsProcessor):
    name = "toy_ban"
    example_args = {"toy_ban": [0, 1, 2, 3]}  # what the conformance kit asks it to ban

    def __init__(self) -> None:
        self.banned: dict[int, list[int]] = {}  # seq_id -> its banned ids
        self.rows: dict[int, int] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # banning the top token changes a greedy row's token

    def update_state(self, batch: BatchUpdate) -> None:
        for seq_id, args in batch.added:
            self.banned[seq_id] = [int(t) for t in args.get("toy_ban", ())]
        for seq_id in batch.removed:
            self.banned.pop(seq_id, None)
        self.rows = dict(batch.rows)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for seq_id, row in self.rows.items():
            ids = self.banned.get(seq_id)
            if ids:
                logits[row, ids] = float("-inf")
        return logits
