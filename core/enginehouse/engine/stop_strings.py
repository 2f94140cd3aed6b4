"""Stop strings: where the first one begins in a growing text, in time linear in what is scanned.

Looking for each stop string separately costs (number of strings) x (text) per step: 400,000
stop strings stalled every client for 30 s. `StopStrings` builds one Aho-Corasick automaton
over all of them, so that a scan reads each character once whatever their number (plus,
amortized, the failure links it follows), and tells how much of the end of the text may still
become a stop string: the automaton's state is the longest suffix of the text that begins one,
so nothing more needs holding back (nor rescanning next time).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

_CACHE_SIZE = 256  # automata kept, least recently used dropped first
_by_words: OrderedDict[tuple[str, ...], StopStrings] = OrderedDict()
_by_list: OrderedDict[int, tuple[Sequence[str], StopStrings]] = OrderedDict()
_lock = threading.Lock()


def _remember(cache: OrderedDict, key: object, value: object) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


class StopStrings:
    """An automaton over `words` (non-empty strings; duplicates are ignored)."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words = tuple(dict.fromkeys(words))
        if not all(self.words):
            raise ValueError("stop strings must not be empty")
        # One state per prefix of a word: its transitions, its length, and the length of the
        # longest word that ends it (0: none).
        self._next: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._word = [0]
        for word in self.words:
            state = 0
            for ch in word:
                child = self._next[state].get(ch)
                if child is None:
                    child = len(self._next)
                    self._next[state][ch] = child
                    self._next.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._word.append(0)
                state = child
            self._word[state] = len(word)
        self._fail = self._failure_links()

    def _failure_links(self) -> list[int]:
        """Per state, the state of its longest proper suffix that is also a prefix (breadth
        first, so that a shorter state is done before it is needed); each state also learns
        the longest word ending there through that suffix."""
        fail = [0] * len(self._next)
        queue = deque(self._next[0].values())
        while queue:
            state = queue.popleft()
            for ch, child in self._next[state].items():
                f = fail[state]
                while f and ch not in self._next[f]:
                    f = fail[f]
                target = self._next[f].get(ch, 0)
                fail[child] = target if target != child else 0
                if not self._word[child]:
                    self._word[child] = self._word[fail[child]]
                queue.append(child)
        return fail

    @classmethod
    def of(cls, words: Sequence[str]) -> StopStrings:
        """The automaton of `words`, built once: found by the list itself (no cost per step
        however many words), else by its contents (the `n` choices of a request share one)."""
        with _lock:
            hit = _by_list.get(id(words))
            if hit is not None and hit[0] is words:
                _by_list.move_to_end(id(words))
                return hit[1]
            key = tuple(words)
            automaton = _by_words.get(key) or cls(key)
            _remember(_by_words, key, automaton)
            _remember(_by_list, id(words), (words, automaton))  # kept, so its id stays its own
            return automaton

    @property
    def longest(self) -> int:
        return max(map(len, self.words), default=0)

    def scan(self, text: str, start: int = 0) -> tuple[int | None, int]:
        """(where the first stop string in `text[start:]` begins, or None; how many characters
        at the end of `text` may begin one and must be held back, 0 once cut).

        `start` is where the text not yet released to the reader begins: the new text, and
        what the previous scan said to hold back (a stop string that ends in the new text
        cannot begin before that). The time is linear in `len(text) - start`.
        """
        state, cut = 0, None
        nxt, fail, depth, word = self._next, self._fail, self._depth, self._word
        for i in range(start, len(text)):
            ch = text[i]
            while ch not in nxt[state] and state:
                state = fail[state]
            state = nxt[state].get(ch, 0)
            if word[state]:
                begins = i + 1 - word[state]
                cut = begins if cut is None else min(cut, begins)
            # Only a stop string under way (begun at i + 1 - depth) could still begin earlier.
            if cut is not None and i + 1 - depth[state] >= cut:
                return cut, 0
        return cut, 0 if cut is not None else depth[state]
