"""Prefix caching: a prompt that begins like an earlier one starts from that prompt's cache row, so only the
rest is prefilled (a system prompt that many chats share, a conversation's earlier turns, a prompt asked again).

The engine keeps each prefilled prompt's cache row on the device (the last ``capacity`` of them, least recently
used out) and matches a new prompt against their prompts token by token, an image by a digest of its features.
A row serves a prefix shorter than its own prompt only while its sliding layers' rings still hold the keys that
prefix needs: always where its prompt fits in the ring, else only the prefix one token short of its prompt
(sliding windows look back ``window - 1`` keys; the ring holds the last ``window``). So a system prompt shared
by chats is reused from any of them that fit the window (512 tokens for gemma-3-1b, 1024 for 4b and up), and a
conversation's next turn, which extends the last turn's whole prompt, from any length. A prompt that shares
more with a kept one than its row can serve has a chunk end where they part, and its row is kept there too
(a copy): so a longer system prompt is reused from the third chat on (where prompts prefill in chunks and the
store has room for two rows or more).
"""

from __future__ import annotations

import collections
import hashlib
import itertools

import numpy as np

MIN_REUSE = 16
"""The fewest prompt tokens worth reusing: a shorter match (a <bos>, a chat's first few template tokens) saves
less than the copy of the row it starts from costs."""


def prompt_keys(ids, token_types=None, image_features=None) -> np.ndarray | None:
    """A prompt as int64 keys, one per token: its id, or for an image's soft tokens a negative digest of that
    image's features (the same for all of its tokens, so two prompts match through an image only where it is
    the same image). None for a prompt whose images cannot be told apart (features without their token types,
    or not one feature row per image token): it is neither matched nor kept."""
    keys = np.asarray(ids, np.int64).copy()
    if token_types is None:
        return None if image_features is not None else keys
    image = np.asarray(token_types).reshape(-1) == 1
    if not image.any():
        return keys
    if image_features is None or image.size != keys.size:
        return None
    features = np.asarray(image_features)
    if features.ndim != 3 or features.shape[0] * features.shape[1] != image.sum():
        return None
    # (the whole of each image's features, not a sample: inline features come from clients, and a crafted match
    # would start one client's prompt from another's image; ~3 ms for a gemma-3-4b image's 2.6 MB on a CPU core)
    digests = [-1 - (int.from_bytes(hashlib.blake2b(np.ascontiguousarray(f).view(np.uint8), digest_size=8).digest(),
                                    "little") >> 1) for f in features]
    keys[image] = np.repeat(np.array(digests, np.int64), features.shape[1])
    return keys


def _run_start(keys: np.ndarray, at: int) -> int:
    """``at``, or where the run of image tokens around it starts if ``at`` falls inside one (a prefill chunk
    never starts inside an image: its tokens attend to each other both ways)."""
    while 0 < at < keys.size and keys[at - 1] < 0 and keys[at] < 0:
        at -= 1
    return at


class PrefixStore:
    """Which prompts' cache rows the device keeps (under integer handles the engine passes to the device
    program), in least-recently-used order; host bookkeeping only, on the engine thread."""

    def __init__(self, capacity: int, ring: int):
        """``ring``: the entries of the model's sliding-layer rings (the sliding window, at most max_length)."""
        if capacity < 1:
            raise ValueError(f"a prefix store holds at least one row, got {capacity}")
        self.capacity, self.ring = capacity, ring
        self._rows: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()  # handle -> prompt keys
        self._handles = itertools.count()

    def __len__(self) -> int:
        return len(self._rows)

    def match(self, keys: np.ndarray) -> tuple[int, int, int]:
        """The kept row to start ``keys``' prompt from and how many of its tokens it provides (at least
        MIN_REUSE, at most all but the last, which must be prefilled for the first token's logits; (-1, 0)
        when no row provides that many), and the longest prefix it shares with any kept prompt (0 if under
        MIN_REUSE), longer than the tokens provided where that prompt's rings lost the keys past it: the
        engine then keeps this prompt's row at that point too, for the next prompt that begins alike (a
        system prompt past the window: from the third chat on). Changes nothing: see ``use``."""
        best, handle, shared = 0, -1, 0
        for h, kept in self._rows.items():
            n = min(kept.size, keys.size - 1)
            differ = np.flatnonzero(kept[:n] != keys[:n])
            common = _run_start(keys, int(differ[0]) if differ.size else n)
            shared = max(shared, common)
            if common > best and (kept.size <= self.ring or common >= kept.size - 1):
                best, handle = common, h
        shared = shared if shared >= MIN_REUSE else 0
        if best < MIN_REUSE:
            return -1, 0, shared
        return handle, best, shared

    def use(self, handle: int) -> None:
        """A prompt starts from this row: it becomes the most recently used."""
        self._rows.move_to_end(handle)

    def add(self, keys: np.ndarray) -> tuple[int, list[int]]:
        """Record ``keys``' row, kept by the device under the handle returned (-1: not worth keeping, too short
        or a prompt already kept, which becomes the most recent), and the handles the device must forget to
        make room."""
        if keys.size < MIN_REUSE:
            return -1, []
        for h, kept in self._rows.items():
            if kept.size == keys.size and np.array_equal(kept, keys):
                self._rows.move_to_end(h)
                return -1, []
        handle = next(self._handles)
        self._rows[handle] = keys
        evicted = []
        while len(self._rows) > self.capacity:
            evicted.append(self._rows.popitem(last=False)[0])
        return handle, evicted

    def remove(self, handle: int) -> None:
        """Forget a row the device did not keep after all (its prefill failed)."""
        self._rows.pop(handle, None)
