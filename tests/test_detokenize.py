"""Streaming text: whole characters only, stop strings across token boundaries never emitted."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lm_worker.detokenize import StopMatcher, StreamDecoder

CORPUS = ["Crème brûlée, naïve café — déjà vu! 日本語のテキスト 🙂🚀 emoji and plain ASCII words."] * 20


@pytest.fixture(scope="module")
def byte_level():
    """A small byte-level BPE: rare characters stay split into several byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS[:1], trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                                              .alphabet(), show_progress=False))
    return tok


@pytest.mark.parametrize("text", ["Crème brûlée 🙂", "日本語 and 🚀🚀 naïve", "plain ascii", "ñ🙂日"])
def test_stream_equals_whole_decode_and_never_splits_a_character(byte_level, text):
    ids = byte_level.encode(text).ids
    pieces = []
    dec = StreamDecoder(byte_level)
    for i in ids:
        pieces.append(dec.push(i))
    pieces.append(dec.flush())
    assert "".join(pieces) == byte_level.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    multi = [t for t in ids if "\ufffd" in byte_level.decode([t])]
    if any(ord(c) > 127 for c in text):
        assert multi, "the test needs characters split across tokens"
        assert "" in pieces[:-1]  # some token completed no character


def test_stop_string_across_pushes_is_cut_and_not_emitted():
    m = StopMatcher(["</end>", "STOP"])
    out = [m.push(t) for t in ["Hello </", "e", "nd> more"]]
    assert "".join(out) == "Hello " and m.stopped
    assert m.push("after") == "" and m.flush() == ""


def test_a_partial_match_that_fails_is_released():
    m = StopMatcher(["STOP"])
    assert m.push("a ST") == "a " and m.push("ART") == "START" and not m.stopped
    assert m.push("x S") == "x " and m.flush() == "S"


def test_earliest_stop_wins_and_no_stops_passes_everything():
    m = StopMatcher(["b", "abc"])
    assert m.push("xxabc") == "xx"  # "abc" starts before "b"
    assert StopMatcher([]).push("anything") == "anything"
