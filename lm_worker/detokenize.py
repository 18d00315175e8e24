"""Streaming detokenization and stop strings, outside the decode loop.

Tokens can end in the middle of a multi-byte character (byte-fallback and byte-level vocabularies
split them), and a stop string can span several tokens. ``StreamDecoder`` emits text only once it
decodes to whole characters; ``StopMatcher`` holds back any tail that could still grow into a stop
string and cuts the text before the first stop string found.
"""

from __future__ import annotations


class StreamDecoder:
    """Incremental decoding with a prefix window (the vLLM/TGI method): each step decodes the last
    few tokens twice, with and without the new ones, and emits the difference once it is whole."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` completes (possibly empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes to U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Feeds text through, holding back what might be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text safe to emit now; after a stop string is found, ``stopped`` is set and nothing more passes."""
        if self.stopped:
            return ""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[: min(hits)]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])),
                   default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out
