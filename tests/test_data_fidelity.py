"""BERT sample rules over many random documents (seeded property tests), whole-word masking, CJK."""

import numpy as np
import pytest

from bertscale.corpus import split_sentences
from bertscale.masking import IGNORE_INDEX, Masker, default_max_predictions, mask_tokens
from bertscale.samples import IN_ORDER, IS_NEXT, SWAPPED, build_samples, split_long_sentences

CLS, SEP = 2, 3


def random_docs(rng, n_docs, max_sent_len=40):
    docs, next_id = [], 10
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(1, 8))):
            n = int(rng.integers(1, max_sent_len))
            doc.append(np.arange(next_id, next_id + n, dtype=np.int32))  # every token unique: traceable
            next_id += n
        docs.append(doc)
    return docs


@pytest.mark.parametrize("case", range(25))
def test_sample_rules_hold_for_random_documents(case):
    rng = np.random.default_rng(case)
    seq_len = int(rng.choice([8, 16, 32, 64, 128]))
    docs = random_docs(rng, int(rng.integers(1, 12)), max_sent_len=int(rng.integers(2, 3 * seq_len)))
    sentence_order = bool(case % 3 == 0)
    where = {int(t): (d, s) for d, doc in enumerate(docs) for s, sent in enumerate(doc) for t in sent}
    samples = list(build_samples(docs, seq_len, np.random.default_rng(case), CLS, SEP, 0.1,
                                 sentence_order=sentence_order))
    assert samples
    for smp in samples:
        ids = smp.ids
        assert len(ids) <= seq_len and ids[0] == CLS and ids[smp.a_len - 1] == SEP and ids[-1] == SEP
        a, b = ids[1 : smp.a_len - 1], ids[smp.a_len : -1]
        assert len(a) >= 1 and len(b) >= 1 and not np.isin([CLS, SEP], np.concatenate([a, b])).any()
        for seg in (a, b):  # each segment is a contiguous run of one document (truncation trims ends only)
            assert np.all(np.diff(seg) == 1) or len({where[int(t)][0] for t in seg}) == 1
        same_doc = where[int(a[0])][0] == where[int(b[0])][0]
        if sentence_order:
            assert same_doc and smp.nsp_label in (IN_ORDER, SWAPPED)
            assert (a[0] < b[0]) == (smp.nsp_label == IN_ORDER)
        elif smp.nsp_label == IS_NEXT:
            assert same_doc and a[-1] < b[0]
        else:
            assert not same_doc


def test_negatives_put_unused_sentences_back():
    rng = np.random.default_rng(7)
    docs = random_docs(rng, 30, max_sent_len=8)
    where = {int(t): d for d, doc in enumerate(docs) for sent in doc for t in sent}
    own = set()
    for smp in build_samples(docs, 128, np.random.default_rng(0), CLS, SEP, 0.0):
        a, b = smp.ids[1 : smp.a_len - 1], smp.ids[smp.a_len : -1]
        own.update(int(t) for t in a)
        if smp.nsp_label == IS_NEXT:
            own.update(int(t) for t in b)
    assert len(own) / len(where) > 0.97  # only truncation at a random end loses a few tokens


def test_short_seq_prob_and_full_targets():
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 400, max_sent_len=20)  # ~700 samples: the means are stable to about +-0.5
    full = [len(s.ids) for s in build_samples(docs, 64, np.random.default_rng(1), CLS, SEP, 0.0)]
    short = [len(s.ids) for s in build_samples(docs, 64, np.random.default_rng(1), CLS, SEP, 1.0)]
    # shorter targets: shorter samples, and more of them from the same text (about 41 vs 33 tokens)
    assert np.mean(full) > np.mean(short) + 5 and len(short) > 1.15 * len(full)


def test_long_sentence_is_split_not_truncated():
    long = np.arange(10, 10 + 300, dtype=np.int32)
    assert [len(p) for p in split_long_sentences([long], 61)] == [60] * 5
    samples = list(build_samples([[long]], 128, np.random.default_rng(0), CLS, SEP, 0.0))
    kept = np.concatenate([np.concatenate([s.ids[1 : s.a_len - 1], s.ids[s.a_len : -1]]) for s in samples])
    # unsplit, the 300-token sentence would give one sample of 125 tokens and lose the rest
    assert len(samples) >= 2 and len(set(kept.tolist())) >= 0.6 * 300


def test_default_max_predictions():
    assert default_max_predictions(128) == 20 and default_max_predictions(512) == 80


def test_masking_rules_over_random_samples():
    vocab, specials = 500, (0, 1, 2, 3, 4)
    rng = np.random.default_rng(0)
    for sid in range(300):
        n = int(rng.integers(3, 200))
        ids = np.concatenate([[2], rng.integers(5, vocab, n), [3], np.zeros(int(rng.integers(0, 4)), int)])
        inp, lab = mask_tokens(ids, seed=1, epoch=2, sample_id=sid, vocab_size=vocab, mask_id=4, special_ids=specials,
                               max_predictions=20)
        target = lab != IGNORE_INDEX
        assert target.sum() == min(20, max(1, int(n * 0.15 + 0.5)))
        assert not np.isin(ids[target], specials).any() and (lab[target] == ids[target]).all()
        assert (inp[~target] == ids[~target]).all() and not np.isin(inp[target], (0, 1, 2, 3)).any()
        again = mask_tokens(ids, seed=1, epoch=2, sample_id=sid, vocab_size=vocab, mask_id=4, special_ids=specials,
                            max_predictions=20)
        assert (again[0] == inp).all() and (again[1] == lab).all()


class Tok:
    vocab_size, mask_id, special_ids = 100, 4, (0, 1, 2, 3, 4)
    continuation_ids = tuple(range(50, 100))  # ids >= 50 play '##' pieces


def test_masker_equals_mask_tokens_and_whole_words():
    rng = np.random.default_rng(3)
    for sid in range(200):
        ids = np.concatenate([[2], rng.integers(5, 100, int(rng.integers(2, 60))), [3]])
        plain = Masker(Tok, seed=5, epoch=1, max_predictions=9)(ids, sid)
        ref = mask_tokens(ids, seed=5, epoch=1, sample_id=sid, vocab_size=100, mask_id=4, special_ids=Tok.special_ids,
                          max_predictions=9)
        assert all((x == y).all() for x, y in zip(plain, ref))
        inp, lab = Masker(Tok, seed=5, epoch=1, max_predictions=9, whole_word=True)(ids, sid)
        ww = mask_tokens(ids, seed=5, epoch=1, sample_id=sid, vocab_size=100, mask_id=4, special_ids=Tok.special_ids,
                         max_predictions=9, continuation_ids=Tok.continuation_ids)
        assert (ww[0] == inp).all() and (ww[1] == lab).all()
        target = lab != IGNORE_INDEX
        # a word = a piece < 50 followed by its pieces >= 50: all targets or none
        word = np.cumsum((ids < 50) | np.isin(ids, Tok.special_ids))
        for w in np.unique(word[1:-1]):
            members = target[word == w][ids[word == w] >= 5] if (ids[word == w] >= 5).any() else []
            assert len(set(np.asarray(members).tolist())) <= 1


def test_cjk_sentences_split():
    assert split_sentences("今天天气很好。我们去公园吧！你来吗？好") == ["今天天气很好。", "我们去公园吧！", "你来吗？", "好"]
    assert split_sentences("他说：“走吧。”然后走了。") == ["他说：“走吧。”", "然后走了。"]
    assert split_sentences('He said "go." Then left.') == ['He said "go."', "Then left."]


def test_chinese_corpus_end_to_end(tmp_path):
    from bertscale.loader import PretrainingLoader
    from bertscale.shards import build_shards
    from bertscale.tokenizer import load_tokenizer, tokenizer_info, train_tokenizer

    rng = np.random.default_rng(0)
    chars = list("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质")
    corpus = tmp_path / "zh.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(150):
            for _ in range(int(rng.integers(1, 4))):
                f.write("".join("".join(rng.choice(chars, int(rng.integers(4, 20)))) + str(rng.choice(list("。！？")))
                                for _ in range(int(rng.integers(1, 4)))) + "\n")
            f.write("\n")
    tok_dir = train_tokenizer([corpus], vocab_size=400, out_dir=tmp_path / "tok", show_progress=False)
    tok = load_tokenizer(tok_dir)
    enc = tok.encode("的一是在。", add_special_tokens=False)
    assert enc.tokens == ["的", "一", "是", "在", "。"]  # one token per character, as BERT's Chinese model
    info = tokenizer_info(tok_dir)
    m = build_shards([corpus], tok_dir, 64, tmp_path / "shards", samples_per_shard=50, show_progress=False)
    assert m["splits"]["train"]["samples"] > 50
    loader = PretrainingLoader(tmp_path / "shards", micro_batch=8, rank=0, world_size=1, seed=0, tokenizer=info)
    batch = next(iter(loader))
    real = batch["input_ids"][batch["attention_mask"].bool()]
    assert (real == info.unk_id).float().mean() < 0.02
    assert (batch["labels"] != IGNORE_INDEX).any()
