import numpy as np
import pytest

from bertscale.samples import IS_NEXT, IS_RANDOM, build_samples, truncation_counts

CLS, SEP = 2, 3


def random_documents(rng, n_docs, max_sents=8, max_len=20, start=5):
    """Documents whose token ids are globally unique and increasing, so positions can be traced."""
    docs, next_id = [], start
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(1, max_sents + 1))):
            n = int(rng.integers(1, max_len + 1))
            doc.append(np.arange(next_id, next_id + n, dtype=np.int32))
            next_id += n
        docs.append(doc)
    return docs


def check_structure(s, seq_len):
    ids = s.ids
    assert ids.dtype == np.int32
    assert len(ids) <= seq_len
    assert ids[0] == CLS and ids[-1] == SEP and ids[s.a_len - 1] == SEP
    assert np.flatnonzero(ids == SEP).tolist() == [s.a_len - 1, len(ids) - 1]
    assert (ids == CLS).sum() == 1
    assert s.a_len >= 3 and len(ids) - s.a_len >= 2  # both segments non-empty
    assert s.nsp_label in (IS_NEXT, IS_RANDOM)


def segments(s):
    return s.ids[1 : s.a_len - 1], s.ids[s.a_len : -1]


def test_truncation_counts():
    assert truncation_counts(3, 4, 10) == (0, 0)
    assert truncation_counts(10, 2, 8) == (4, 0)
    assert truncation_counts(5, 5, 8) == (1, 1)
    assert truncation_counts(5, 5, 7) == (1, 2)
    assert truncation_counts(100, 1, 2) == (99, 0)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        a, b, m = (int(x) for x in rng.integers(1, 60, size=3))
        m = max(m, 2)
        da, db = truncation_counts(a, b, m)
        assert a - da >= 1 and b - db >= 1 and (a + b <= m or a - da + b - db == m)


@pytest.mark.parametrize("seq_len", [8, 32, 128])
def test_structure_and_lengths(seq_len):
    rng = np.random.default_rng(seq_len)
    for trial in range(20):
        docs = random_documents(rng, int(rng.integers(1, 12)), max_len=int(rng.integers(1, 2 * seq_len)))
        for s in build_samples(docs, seq_len, rng, CLS, SEP, short_seq_prob=0.3):
            check_structure(s, seq_len)


def test_positive_pairs_are_contiguous_and_negatives_cross_documents():
    rng = np.random.default_rng(1)
    docs = random_documents(rng, 200, max_len=15)
    owner = {}
    for d, doc in enumerate(docs):
        for sent in doc:
            for t in sent:
                owner[int(t)] = d
    seq_len = 64
    samples = list(build_samples(docs, seq_len, rng, CLS, SEP))
    n_pos = 0
    for s in samples:
        a, b = segments(s)
        # each segment is a contiguous run of text (ids increase by one)
        assert np.all(np.diff(a) == 1) or s.nsp_label == IS_RANDOM
        assert np.all(np.diff(b) == 1)
        assert len({owner[int(t)] for t in a}) == 1 and len({owner[int(t)] for t in b}) == 1
        if s.nsp_label == IS_NEXT:
            n_pos += 1
            assert owner[int(a[0])] == owner[int(b[0])]
            assert a[-1] < b[0]
            if len(s.ids) < seq_len:  # nothing was truncated: A then B exactly
                assert b[0] == a[-1] + 1
        else:
            assert owner[int(a[0])] != owner[int(b[0])]
    assert n_pos > 0


def test_label_balance_and_text_coverage():
    rng = np.random.default_rng(2)
    # long documents, so that one-sentence chunks (always random) are rare, as in real corpora
    docs = random_documents(rng, 150, max_sents=100, max_len=12)
    total = sum(len(s) for d in docs for s in d)
    samples = list(build_samples(docs, 64, rng, CLS, SEP))
    labels = np.array([s.nsp_label for s in samples])
    assert len(samples) > 500
    assert 0.45 < labels.mean() < 0.56
    # short documents (one or two sentences, like docstrings): still balanced (Google's rule gave ~72 %)
    short = random_documents(rng, 3000, max_sents=2, max_len=12)
    short_labels = np.array([s.nsp_label for s in build_samples(short, 128, rng, CLS, SEP)])
    assert len(short_labels) > 1000 and 0.44 < short_labels.mean() < 0.56, short_labels.mean()
    # put-back of unused sentences: the A segments cover most of the corpus text
    a_tokens = sum(s.a_len - 2 for s in samples)
    pos_b_tokens = sum(len(s.ids) - s.a_len - 1 for s in samples if s.nsp_label == IS_NEXT)
    assert a_tokens + pos_b_tokens > 0.9 * total


def test_deterministic():
    docs = random_documents(np.random.default_rng(3), 30)
    s1 = list(build_samples(docs, 48, np.random.default_rng(9), CLS, SEP))
    s2 = list(build_samples(docs, 48, np.random.default_rng(9), CLS, SEP))
    assert len(s1) == len(s2)
    assert all(np.array_equal(x.ids, y.ids) and x.a_len == y.a_len and x.nsp_label == y.nsp_label
               for x, y in zip(s1, s2))


def test_edge_cases():
    rng = np.random.default_rng(4)
    # single document, several sentences: all samples positive
    one = [[np.arange(5, 15), np.arange(15, 25), np.arange(25, 30)]]
    out = list(build_samples(one, 16, rng, CLS, SEP))
    assert out and all(s.nsp_label == IS_NEXT for s in out)
    for s in out:
        check_structure(s, 16)
    # single one-sentence document: split inside the sentence
    out = list(build_samples([[np.arange(5, 12)]], 32, rng, CLS, SEP))
    assert len(out) == 1 and out[0].ids.tolist() == [CLS, *range(5, 5 + out[0].a_len - 2), SEP,
                                                     *range(5 + out[0].a_len - 2, 12), SEP]
    # one-sentence documents only: a coin each; a continuation is the sentence split inside itself
    docs = [[np.arange(5 + 10 * i, 10 + 10 * i)] for i in range(10)]
    out = list(build_samples(docs, 32, rng, CLS, SEP))
    assert len(out) == 10 and {s.nsp_label for s in out} == {IS_NEXT, IS_RANDOM}
    for s in out:
        a, b = segments(s)
        assert (b[0] == a[-1] + 1) == (s.nsp_label == IS_NEXT)
    # single-token sentences can only be paired with a random B
    docs = [[np.array([5 + i])] for i in range(10)]
    assert all(s.nsp_label == IS_RANDOM for s in build_samples(docs, 32, rng, CLS, SEP))
    # a sentence far longer than seq_len
    docs = [[np.arange(5, 1000)], [np.arange(1000, 1010), np.arange(1010, 3000)]]
    for _ in range(20):
        for s in build_samples(docs, 16, rng, CLS, SEP):
            check_structure(s, 16)
    # empty sentences and empty documents are ignored; one lone token cannot make a pair
    assert list(build_samples([[], [np.array([], dtype=np.int32)]], 16, rng, CLS, SEP)) == []
    assert list(build_samples([[np.array([7])]], 16, rng, CLS, SEP)) == []
    with pytest.raises(ValueError, match="seq_len 4"):
        list(build_samples(docs, 4, rng, CLS, SEP))
