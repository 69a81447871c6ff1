"""Finished sequences' KV cells kept in host memory once the context's cache lets them go.

The batch scheduler (``batch.py``) keeps a few finished sequences in the context's KV
cache for prefix reuse. When it drops one (the least recently used, for room or over its
count), the sequence's cells are copied out here first (``llama_state_seq_get_data``:
positions and K/V of every layer, a few MiB for a chat turn of a small model), up to a
byte budget, least recently used dropped first. A new job whose tokens share a longer
prefix with a saved sequence than with anything in the KV cache has that sequence copied
back into cells of its own (``llama_state_seq_set_data``, a memory copy) and its tail
past the shared prefix removed: it evaluates only the rest. This is what llama.cpp's
server calls its prompt cache (``--cache-ram``): more conversations than slots keep their
history without being evaluated again.

Only the scheduler thread uses it (it reads and writes the context).
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from dataclasses import dataclass

import llama_cpp

log = logging.getLogger(__name__)

MIN_TOKENS = 16  # shorter prefixes are cheaper to evaluate than to find and copy back


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens ``a`` and ``b`` share, at most ``limit``."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:  # the usual case for a conversation's next turn: one C comparison
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def seq_state(ctx: llama_cpp.llama_context_p, seq_id: int, budget: int | None = None) -> bytes:
    """A sequence's cells as llama.cpp writes them (b"" when empty or over ``budget``)."""
    size = int(llama_cpp.llama_state_seq_get_size(ctx, seq_id))
    if budget is not None and size > budget:
        return b""
    buffer = (ctypes.c_uint8 * size)()
    written = int(llama_cpp.llama_state_seq_get_data(ctx, buffer, size, seq_id))
    return ctypes.string_at(buffer, written)  # one copy


def load_seq_state(ctx: llama_cpp.llama_context_p, state: bytes, seq_id: int) -> bool:
    """Write ``state`` into ``seq_id``'s cells (what they held is removed first, also into
    another stream of a split cache); False when the context has no room."""
    buffer = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
    return int(llama_cpp.llama_state_seq_set_data(ctx, buffer, len(state), seq_id)) != 0


@dataclass(frozen=True, slots=True)
class Saved:
    """One sequence's tokens and its state as llama.cpp wrote it."""

    tokens: list[int]
    state: bytes

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(self.tokens)


class HostCache:
    """Saved sequences within ``budget`` bytes, least recently used first out."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._saved: OrderedDict[tuple[int, ...], Saved] = OrderedDict()
        self.saves = 0  # sequences saved
        self.restores = 0  # sequences copied back into the context

    def __len__(self) -> int:
        return len(self._saved)

    def save(self, ctx: llama_cpp.llama_context_p, seq_id: int, tokens: list[int]) -> None:
        """Copy a sequence's cells out before the context drops them (if they fit)."""
        if len(tokens) < MIN_TOKENS or not self.budget:
            return
        key = tuple(tokens)
        if key in self._saved:
            self._saved.move_to_end(key)
            return
        state = seq_state(ctx, seq_id, self.budget)
        if not state:
            return
        for other in [k for k in self._saved if len(k) <= len(key) and key[: len(k)] == k]:
            self._forget(other)  # a prefix of this one: this one serves whoever it would
        self._saved[key] = Saved(list(tokens), state)
        self.used += len(state)
        self.saves += 1
        while self.used > self.budget:
            self._forget(next(iter(self._saved)))

    def best(self, tokens: list[int], limit: int, better_than: int) -> tuple[Saved, int] | None:
        """The saved sequence sharing the longest prefix with ``tokens`` (at most ``limit``),
        if longer than ``better_than`` and worth copying back."""
        found: tuple[Saved, int] | None = None
        for saved in self._saved.values():
            n = common_prefix(saved.tokens, tokens, limit)
            if n > max(better_than, MIN_TOKENS - 1) and (found is None or n > found[1]):
                found = (saved, n)
        return found

    def restore(self, ctx: llama_cpp.llama_context_p, saved: Saved, seq_id: int) -> bool:
        """Copy a saved sequence into ``seq_id``'s cells; False when the context has no room."""
        if not load_seq_state(ctx, saved.state, seq_id):
            return False
        self.restores += 1
        if saved.key in self._saved:  # (let go meanwhile, for room)
            self._saved.move_to_end(saved.key)
        return True

    def discard(self, saved: Saved) -> None:
        """Forget a saved sequence (the context holds it again, or will hold more of it)."""
        if saved.key in self._saved:
            self._forget(saved.key)

    def _forget(self, key: tuple[int, ...]) -> None:
        self.used -= len(self._saved.pop(key).state)
