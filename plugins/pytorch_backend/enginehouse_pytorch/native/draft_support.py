"""Which native models can run a draft head (torch-free: the probe reads it)."""

from __future__ import annotations

from .arch import Arch


def draft_refusal(arch: Arch) -> str:
    """Why the native backend runs no draft head for `arch` ('' where it does)."""
    if arch.linear is not None:
        return (
            f"runs no draft head for {arch.family}: its linear-attention layers keep a "
            "recurrent state that cannot take back rejected tokens, so it verifies no proposals"
        )
    if any(arch.windows):
        return (
            f"runs no draft head for {arch.family} yet: its sliding-window layers' KV groups "
            "are not followed by the head's cache"
        )
    return ""
