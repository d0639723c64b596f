import numpy as np
import pytest

from bertscale.masking import IGNORE_INDEX, mask_tokens

SPECIALS = [0, 1, 2, 3, 4]
MASK = 4
VOCAB = 1000


def sample(rng, n=100):
    ids = rng.integers(5, VOCAB, size=n)
    ids[0], ids[n // 2], ids[-1] = 2, 3, 3
    return ids


def run(ids, **kw):
    args = dict(seed=1, epoch=0, sample_id=7, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)
    args.update(kw)
    return mask_tokens(ids, **args)


def test_deterministic_and_varies_with_epoch_and_id():
    ids = sample(np.random.default_rng(0))
    a_in, a_lab = run(ids)
    b_in, b_lab = run(ids)
    assert np.array_equal(a_in, b_in) and np.array_equal(a_lab, b_lab)
    assert a_in.dtype == np.int64 and a_lab.dtype == np.int64 and a_in.shape == ids.shape
    c_in, c_lab = run(ids, epoch=1)
    d_in, d_lab = run(ids, sample_id=8)
    assert not np.array_equal(a_lab, c_lab) and not np.array_equal(a_lab, d_lab)
    assert not np.array_equal(ids, a_in)


def test_labels_and_specials():
    rng = np.random.default_rng(1)
    for sid in range(200):
        ids = sample(rng, n=int(rng.integers(10, 128)))
        ids[3] = 0  # padding-like special in the middle
        orig = ids.copy()
        inp, lab = run(ids, sample_id=sid)
        assert np.array_equal(ids, orig)
        special = np.isin(orig, SPECIALS)
        assert np.all(lab[special] == IGNORE_INDEX) and np.array_equal(inp[special], orig[special])
        target = lab != IGNORE_INDEX
        assert np.array_equal(lab[target], orig[target])
        assert np.array_equal(inp[~target], orig[~target])
        assert not np.isin(inp[target & (inp != MASK)], SPECIALS).any()
        n_cand = int((~special).sum())
        assert target.sum() == max(1, round(n_cand * 0.15 + 1e-9))


def test_proportions_80_10_10():
    rng = np.random.default_rng(2)
    n_masked = n_random = n_kept = n_targets = n_cand = 0
    for sid in range(2000):
        ids = sample(rng, 128)
        inp, lab = run(ids, sample_id=sid, seed=5)
        t = lab != IGNORE_INDEX
        n_targets += t.sum()
        n_cand += (~np.isin(ids, SPECIALS)).sum()
        n_masked += (inp[t] == MASK).sum()
        n_kept += (inp[t] == ids[t]).sum()
        n_random += ((inp[t] != MASK) & (inp[t] != ids[t])).sum()
    assert abs(n_targets / n_cand - 0.15) < 0.005
    assert abs(n_masked / n_targets - 0.8) < 0.01
    assert abs(n_random / n_targets - 0.1) < 0.01
    assert abs(n_kept / n_targets - 0.1) < 0.01  # includes random draws that hit the same id (rare)


def test_cap_and_edge_cases():
    ids = sample(np.random.default_rng(3), 500)
    _, lab = run(ids, max_predictions=20)
    assert (lab != IGNORE_INDEX).sum() == 20
    _, lab = run(np.array([2, 9, 3]))
    assert (lab != IGNORE_INDEX).sum() == 1 and lab[1] == 9
    inp, lab = run(np.array([2, 3, 0, 0]))
    assert np.all(lab == IGNORE_INDEX) and inp.tolist() == [2, 3, 0, 0]


def test_random_tokens_skip_non_contiguous_specials():
    specials = [0, 10, 11, 12, 20]
    ids = np.arange(21, 40)
    seen = set()
    for sid in range(3000):
        inp, lab = mask_tokens(ids, seed=0, epoch=0, sample_id=sid, vocab_size=25, mask_id=20,
                               special_ids=specials, mask_prob=0.5)
        t = (lab != IGNORE_INDEX) & (inp != 20) & (inp != ids)
        seen.update(inp[t].tolist())
    assert seen and not seen & set(specials) and max(seen) < 25 and {1, 9, 13, 24} <= seen
