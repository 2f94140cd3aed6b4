"""Comparing logits and greedy tokens, and saying exactly where they differ."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .driver import Seq
from .result import Mismatch


@dataclass(frozen=True)
class Tolerance:
    """|got - expected| <= atol + rtol * |expected|, elementwise."""

    atol: float
    rtol: float

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> Tolerance:
        # float32 as tight as the project's own tests hold the native backend to
        # transformers; 16-bit runs round every product, so their rows agree far less.
        if dtype in (torch.float32, torch.float64):
            return cls(1e-4, 1e-4)
        return cls(5e-2, 5e-2)

    def __str__(self) -> str:
        return f"atol {self.atol:g}, rtol {self.rtol:g}"


def row_difference(got: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> str | None:
    """None when the rows agree, else a description of the largest difference."""
    got, expected = got.float(), expected.float()
    excess = (got - expected).abs() - tol.atol - tol.rtol * expected.abs()
    if bool((excess <= 0).all()):
        return None
    i = int(excess.argmax())
    return (
        f"logit of token {i}: expected {float(expected[i]):.6g}, got {float(got[i]):.6g} "
        f"({tol}); argmax expected {int(expected.argmax())}, got {int(got.argmax())}"
    )


def compare_rows(got: torch.Tensor, expected: torch.Tensor, tol: Tolerance, where: str) -> None:
    """Logits rows [n, vocab] must agree row by row; the first that does not is named."""
    for i, (g, e) in enumerate(zip(got, expected)):
        diff = row_difference(g, e, tol)
        if diff:
            raise Mismatch(f"{where}, row {i}: {diff}")


def first_difference(got: Sequence[int], expected: Sequence[int]) -> int | None:
    """The first index where two token lists differ (one ending counts), or None."""
    pairs = enumerate(zip([*got, None], [*expected, None]))
    return next((i for i, (a, b) in pairs if a != b), None)


def compare_streams(got: Seq, expected: Seq, tol: Tolerance, how: str) -> None:
    """A sequence's generated logits and greedy tokens against a reference run of the same
    prompt. A token may differ only where the logits agree (a near tie): the two runs then
    go on from different contexts, so the comparison stops there."""
    for i, (g_row, e_row) in enumerate(zip(got.rows, expected.rows)):
        pos = expected.num_prompt - 1 + i
        where = f"{got.label} {how}, position {pos} (generated token {i})"
        diff = row_difference(g_row, e_row, tol)
        g_tok, e_tok = got.generated[i], expected.generated[i]
        if diff:
            raise Mismatch(f"{where}: expected token {e_tok}, got {g_tok}; {diff}")
        if g_tok != e_tok:
            return
    if len(got.rows) != len(expected.rows):
        raise Mismatch(
            f"{got.label} {how}: {len(got.rows)} generated tokens, expected {len(expected.rows)}"
        )
