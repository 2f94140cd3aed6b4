"""Which native models can run a draft head (torch-free: the probe reads it)."""

from __future__ import annotations

from .arch import Arch


def draft_refusal(arch: Arch, method: str | None = None) -> str:
    """Why the native backend runs no draft head `method` ('eagle3', 'eagle', 'mtp'; None:
    any head) for `arch` ('' where it does). Hybrid models run their own MTP layers
    (`HybridDraftingRunner`); whether the checkpoint has them is checked at load."""
    if arch.linear is not None and method != "mtp":
        return (
            f"runs no EAGLE head for {arch.family}: the hybrid runner drafts with the "
            "checkpoint's own MTP layers only (method 'mtp'); EAGLE heads on its hidden states "
            "are not built for it"
        )
    if any(arch.windows):
        return (
            f"runs no draft head for {arch.family} yet: its sliding-window layers' KV groups "
            "are not followed by the head's cache"
        )
    return ""
