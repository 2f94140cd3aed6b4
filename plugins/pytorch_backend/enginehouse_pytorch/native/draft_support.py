"""Which native models can run a draft head (torch-free: the probe reads it)."""

from __future__ import annotations

from .arch import Arch


def draft_refusal(arch: Arch) -> str:
    """Why the native backend runs no draft head for `arch` ('' where it does)."""
    if arch.linear is not None:
        return (
            f"runs no draft head for {arch.family} yet: the hybrid runner verifies proposals "
            "(its linear-attention states are kept per verified position), but the heads "
            "(and Qwen3-Next's MTP layers) are built for the plain native runner only"
        )
    if any(arch.windows):
        return (
            f"runs no draft head for {arch.family} yet: its sliding-window layers' KV groups "
            "are not followed by the head's cache"
        )
    return ""
