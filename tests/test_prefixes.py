"""The prefix store's bookkeeping: which kept prompt a new one starts from, and for how many tokens."""

import numpy as np
import pytest

from lm_worker.prefixes import MIN_REUSE, PrefixStore, prompt_keys


def _image_prompt(features: np.ndarray, lead: int = 20, tail: int = 4):
    """``lead`` text tokens, the images' soft tokens (id 99), ``tail`` text tokens: (ids, types)."""
    soft = features.shape[0] * features.shape[1]
    ids = list(range(1, lead + 1)) + [99] * soft + list(range(200, 200 + tail))
    return ids, np.array([0] * lead + [1] * soft + [0] * tail, np.int32)


def test_prompt_keys_tell_images_apart_by_their_features():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 8)).astype(np.float32), rng.normal(size=(2, 3, 8)).astype(np.float32)
    ids, types = _image_prompt(a)
    keys = prompt_keys(ids, types, a)
    assert keys.dtype == np.int64 and (keys[types == 0] == np.array(ids)[types == 0]).all()
    assert (keys[types == 1] < 0).all() and len(set(keys[20:23])) == 1 and keys[20] != keys[23]  # one per image
    assert (prompt_keys(ids, types, a.copy()) == keys).all()  # the same features: the same keys
    other = prompt_keys(ids, types, np.stack([a[0], b[1]]))
    assert (other[:23] == keys[:23]).all() and (other[23:26] != keys[23:26]).all()  # the second image differs
    assert (prompt_keys([5, 6, 7]) == [5, 6, 7]).all()
    assert prompt_keys(ids, None, a) is None  # images that cannot be told apart: not cached
    assert prompt_keys(ids, types, a[:1]) is None  # not one feature row per image token


def _keys(*parts) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.int64) for p in parts])


def test_a_kept_row_serves_any_shared_prefix_within_its_ring_and_past_it_only_the_whole_prompt():
    store = PrefixStore(capacity=4, ring=32)
    system = np.arange(1, 21)
    short, _ = store.add(_keys(system, [500, 501]))  # 22 tokens: fits the ring
    long, _ = store.add(_keys(system, np.arange(600, 640)))  # 60 tokens: its ring wrapped
    assert store.match(_keys(system, [700, 701, 702])) == (short, 20, 20)  # (not the long one: its ring lost them)
    assert store.match(_keys(system, np.arange(600, 640), [9])) == (long, 60, 60)  # a conversation's next turn
    assert store.match(_keys(system, np.arange(600, 640))) == (long, 59, 59)  # the same prompt: all but its last token
    # 50 tokens shared with the long one, which serves none of them: the short one serves 20, and the engine
    # keeps this prompt's row at 50 too
    assert store.match(_keys(system, np.arange(600, 630), [9, 9])) == (short, 20, 50)
    assert store.match(_keys(system[:MIN_REUSE - 1], [800] * 10)) == (-1, 0, 0)  # too short a match to pay
    assert store.match(_keys(system, [500, 501], [5] * 3)) == (short, 22, 22)
    store.remove(short)
    assert store.match(_keys(system, [700, 701, 702])) == (-1, 0, 20)


def test_a_match_never_ends_inside_an_image():
    store = PrefixStore(capacity=2, ring=64)
    image = [-7] * 9
    kept, _ = store.add(_keys(np.arange(1, 21), image, [30, 31]))
    assert store.match(_keys(np.arange(1, 21), image, [40])) == (kept, 29, 29)
    assert store.match(_keys(np.arange(1, 21), [-8] * 9, [30])) == (kept, 20, 20)  # another image: up to its start
    assert store.match(_keys(np.arange(1, 21), image)) == (kept, 20, 20)  # (its last token is the image's)


def test_the_least_recently_used_row_goes_first_and_a_prompt_is_kept_once():
    store = PrefixStore(capacity=2, ring=64)
    a, b, c = (_keys([k] * 20) for k in (1, 2, 3))
    ha, _ = store.add(a)
    hb, _ = store.add(b)
    assert store.add(a.copy()) == (-1, [])  # kept already: now the most recent
    hc, evicted = store.add(c)
    assert evicted == [hb] and len(store) == 2
    assert store.match(_keys(a, [4]))[:2] == (ha, 20)
    store.use(ha)  # a prompt that starts from it makes it the most recent too
    assert store.add(_keys([5] * 20))[1] == [hc]
    assert store.add(_keys([5] * (MIN_REUSE - 1))) == (-1, [])  # too short to keep
    store.remove(ha)
    assert store.match(_keys(a, [4])) == (-1, 0, 0)
    with pytest.raises(ValueError, match="at least one row"):
        PrefixStore(capacity=0, ring=8)
