"""`StopStrings`: the first stop string in a growing text, found in one pass, and what to hold."""

from __future__ import annotations

import random
import time

import pytest

from enginehouse.engine.stop_strings import StopStrings


def first_hit(text: str, words: list[str], start: int) -> int | None:
    """What the engine did before: each word looked for separately."""
    hits = [i for w in words if (i := text.find(w, start)) >= 0]
    return min(hits) if hits else None


def may_begin_one(text: str, words: list[str]) -> int:
    """Characters at the end of `text` that begin some stop string (and are not one)."""
    for n in range(min(len(text), max(map(len, words))), 0, -1):
        if any(len(w) > n and w.startswith(text[-n:]) for w in words):
            return n
    return 0


def test_a_growing_text_is_cut_and_held_as_by_looking_for_each_word():
    rng = random.Random(0)
    for _ in range(2000):
        words = [
            "".join(rng.choices("ab c", k=rng.randint(1, 5))) for _ in range(rng.randint(1, 6))
        ]
        stops = StopStrings(words)
        text, released = "", 0
        for _ in range(30):
            old = len(text)
            text += "".join(rng.choices("abc ", k=rng.randint(0, 3)))
            cut, hold = stops.scan(text, released)
            assert cut == first_hit(text, words, max(0, old - stops.longest + 1))
            if cut is not None:
                assert hold == 0
                break
            assert hold == may_begin_one(text, words)
            released = max(released, len(text) - hold)


def test_the_scan_does_not_grow_with_the_number_of_words():
    """400,000 stop strings were each looked for at every step (30 s for the other clients)."""
    text = "the quick brown fox jumps over the lazy dog " * 2000
    few = StopStrings(["stop-1-here", "stop-2-here"])
    many = StopStrings([f"stop-{i}-here" for i in range(20_000)])

    def seconds(stops: StopStrings) -> float:
        start = time.perf_counter()
        assert stops.scan(text) == (None, 0)
        return time.perf_counter() - start

    assert seconds(many) < 5 * seconds(few) + 0.05


def test_the_earliest_start_wins_and_words_are_cached_by_list():
    stops = StopStrings(["bcd", "abcdef", "c"])
    # "c" ends first, but "abcdef", under way then, begins earlier: the text ends before it.
    assert stops.scan("xxabcdefg") == (2, 0)
    assert stops.scan("xxabcd") == (3, 0)  # "abcdef" may not come: "bcd" is there
    assert stops.scan("xxab") == (None, 2)
    words = ["</s>", "###"]
    assert StopStrings.of(words) is StopStrings.of(words)
    assert StopStrings.of(list(words)) is StopStrings.of(words)  # same contents, same one
    with pytest.raises(ValueError, match="must not be empty"):
        StopStrings(["a", ""])
