"""`bertscale finetune`: a tiny task made here is learned, metrics are right, task files are read or refused
with file and line, the control really starts from random weights, and the CLI prints one JSON line."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bertscale import cli
from bertscale.finetune import (
    Example, TaskData, TaskFormatError, accuracy, build_classifier, classification_metrics, f1_score, finetune,
    load_pair_tokenizer, load_task, matthews_corrcoef,
)
from bertscale.hf_format import save_hf
from bertscale.model import BertConfig, BertForPreTraining
from bertscale.tokenizer import tokenizer_info

REPO = Path(__file__).resolve().parent.parent
# Small enough to train in seconds on a shared 2-core machine, fast enough that the task needs few epochs.
FAST = dict(epochs=4, lr=2e-3, batch_size=16, max_seq_len=32, seed=3)


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny BertForPreTraining (random weights) saved as `bertscale convert` does, with its tokenizer."""
    config = BertConfig(vocab_size=tokenizer_info(tokenizer_dir).vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    return save_hf(model.state_dict(), config, tmp_path_factory.mktemp("hf"), tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def word_groups(tokenizer_dir) -> tuple[list[str], list[str]]:
    """Two disjoint sets of whole words of the tokenizer's vocabulary: which set a sentence draws from is
    its class, learnable from the tokens alone."""
    vocab = (Path(tokenizer_dir) / "vocab.txt").read_text(encoding="utf-8").split()
    words = sorted(w for w in vocab if w.isalpha() and len(w) >= 3)
    assert len(words) >= 20, words
    return words[0::2], words[1::2]


def sentence(rng: np.random.Generator, words: list[str]) -> str:
    return " ".join(rng.choice(words, size=int(rng.integers(4, 9))))


def single_task(groups, n: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    return [(sentence(rng, groups[label]), int(label)) for label in labels]


def write_sst2(task: Path, groups, n_train: int = 240, n_dev: int = 80) -> Path:
    task.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train.tsv", n_train, 1), ("dev.tsv", n_dev, 2)):
        rows = "".join(f"{text}\t{label}\n" for text, label in single_task(groups, n, seed))
        (task / name).write_text("sentence\tlabel\n" + rows, encoding="utf-8")
    return task


# ------------------------------------------------------------------------------------------------ learning

def test_learns_a_single_sentence_task_and_reports_every_metric(model_dir, word_groups, tmp_path):
    result = finetune(model_dir, write_sst2(tmp_path / "sst", word_groups), **FAST)
    assert result["accuracy"] >= 0.9, result  # chance is about 0.5
    assert result["mcc"] >= 0.8 and result["f1"] >= 0.9, result
    assert result["positive_label"] == "1" and result["labels"] == ["0", "1"]
    assert result["init"] == "pretrained" and result["task"] == "sst"
    assert result["train_examples"] == 240 and result["dev_examples"] == 80
    assert result["device"] == "cpu" and math.isfinite(result["train_loss"]) and result["skipped_rows"] == 0
    json.dumps(result)  # the CLI prints it as one JSON line


def test_mean_pooling_learns_the_task_and_ignores_padding(model_dir, word_groups, tmp_path):
    """pooling="mean" (the demo's probe reads it): the classifier learns from the mean of the real tokens,
    and an example scores the same alone as beside a longer one (its padding does not count)."""
    result = finetune(model_dir, write_sst2(tmp_path / "sst", word_groups), pooling="mean", **FAST)
    assert result["accuracy"] >= 0.9 and result["pooling"] == "mean", result
    model = build_classifier(model_dir, 2, pooling="mean").eval()
    tok = load_pair_tokenizer(model_dir, 32)
    short, long = (torch.tensor(tok.encode(text).ids) for text in ("kalo mi", "kalo mi dorfis sa ti rusa mine"))
    batch = torch.zeros(2, len(long), dtype=torch.long)
    batch[0, :len(short)], batch[1] = short, long
    mask = (batch != 0).long()
    with torch.no_grad():
        alone = model(short[None])
        padded = model(batch, torch.zeros_like(batch), mask)
    torch.testing.assert_close(padded[0], alone[0])
    assert not torch.allclose(padded[0], padded[1])


def test_learns_a_pair_task_that_only_the_second_sentence_decides(model_dir, word_groups):
    """In-memory TaskData (what the demo's probe passes); the label is the group of text_b, so a classifier
    that never saw the second sentence would stay at chance."""
    rng = np.random.default_rng(5)

    def examples(n):
        out = []
        for _ in range(n):
            label = int(rng.integers(0, 3)) % 2
            out.append(Example(text=sentence(rng, word_groups[int(rng.integers(0, 2))]),
                               text_b=sentence(rng, word_groups[label]), label=("no", "yes")[label]))
        return out

    data = TaskData(train=examples(240), dev=examples(80), name="probe")
    result = finetune(model_dir, data, **FAST)
    assert result["accuracy"] >= 0.9, result
    assert result["labels"] == ["no", "yes"] and result["positive_label"] == "yes" and "f1" in result


def test_same_seed_gives_the_same_figures_and_another_seed_does_not(model_dir, word_groups, tmp_path):
    task = write_sst2(tmp_path / "sst", word_groups, n_train=64, n_dev=32)
    settings = {**FAST, "epochs": 1}
    first, again = (finetune(model_dir, task, **settings) for _ in range(2))
    other = finetune(model_dir, task, **{**settings, "seed": 4})
    first.pop("seconds"), again.pop("seconds")
    assert first == again
    assert other["train_loss"] != first["train_loss"]


# ------------------------------------------------------------------------------------------------ the model

def test_from_scratch_has_the_same_shapes_and_none_of_the_pretrained_weights(model_dir):
    pretrained = build_classifier(model_dir, num_labels=2, seed=7).state_dict()
    scratch = build_classifier(model_dir, num_labels=2, from_scratch=True, seed=7).state_dict()
    saved = load_file(str(model_dir / "model.safetensors"))
    assert {k: v.shape for k, v in scratch.items()} == {k: v.shape for k, v in pretrained.items()}
    for key, value in pretrained.items():
        if key.startswith("bert."):
            assert torch.equal(value, saved[key]), key  # the loaded encoder is the saved one
        if key.startswith("bert.") and value.dim() == 2:  # every matrix is drawn afresh
            assert not torch.equal(scratch[key], value), key
    # the control differs only in the encoder: the head is the same draw
    assert torch.equal(scratch["classifier.weight"], pretrained["classifier.weight"])
    again = build_classifier(model_dir, num_labels=2, from_scratch=True, seed=7).state_dict()
    assert all(torch.equal(again[k], v) for k, v in scratch.items())


def test_classifier_computes_what_transformers_does(model_dir):
    transformers = pytest.importorskip("transformers")
    ours = build_classifier(model_dir, num_labels=3).eval()
    with torch.no_grad():  # off its init, so a mis-wired head changes the logits
        ours.classifier.weight.mul_(50.0)
        ours.classifier.bias.normal_()
    theirs = transformers.BertForSequenceClassification(
        transformers.BertConfig.from_pretrained(model_dir, num_labels=3)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # Hugging Face's names, nothing missing or extra
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, ours.config.vocab_size, (3, 12), generator=g)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, types, mask), expected)


def test_pairs_are_tokenized_as_bert_tokenizer_fast_does(model_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BertTokenizerFast.from_pretrained(model_dir)
    ours = load_pair_tokenizer(model_dir, max_seq_len=12)
    a, b = "kalo mine ruso tivo zepa dorlen fisgar", "ka lo"
    for pair in ((a, b), (b, a), (a, a), (a, None)):
        mine = ours.encode(*[t for t in pair if t is not None])
        expected = theirs(*pair, truncation="longest_first", max_length=12)
        assert mine.ids == expected["input_ids"] and mine.type_ids == expected["token_type_ids"], pair
        assert len(mine.ids) == 12


# ------------------------------------------------------------------------------------------------ metrics

def test_metrics_match_hand_computed_values():
    gold = [1, 1, 1, 0, 0, 0, 1, 0]
    pred = [1, 0, 1, 0, 1, 0, 1, 0]  # TP 3, FN 1, FP 1, TN 3
    assert accuracy(pred, gold) == 6 / 8
    assert f1_score(pred, gold) == 2 * 3 / (2 * 3 + 1 + 1)
    assert matthews_corrcoef(pred, gold) == pytest.approx((3 * 3 - 1 * 1) / math.sqrt(4 * 4 * 4 * 4))
    assert f1_score(pred, gold, positive=0) == 0.75
    # three classes: confusion rows (gold) [[2,1,0],[0,2,0],[1,0,1]]; c=5, s=7, t=(3,2,2), p=(3,3,1)
    gold3 = [0, 0, 0, 1, 1, 2, 2]
    pred3 = [0, 0, 1, 1, 1, 0, 2]
    expected = (5 * 7 - (3 * 3 + 3 * 2 + 1 * 2)) / math.sqrt((49 - (9 + 9 + 1)) * (49 - (9 + 4 + 4)))
    assert matthews_corrcoef(pred3, gold3) == pytest.approx(expected)
    assert classification_metrics(pred3, gold3, ["a", "b", "c"]) == {"accuracy": 5 / 7, "mcc": expected}


def test_binary_mcc_is_the_two_by_two_formula_and_degenerate_cases_are_zero():
    rng = np.random.default_rng(0)
    for _ in range(20):
        gold, pred = rng.integers(0, 2, 30).tolist(), rng.integers(0, 2, 30).tolist()
        tp = sum(p == g == 1 for p, g in zip(pred, gold))
        tn = sum(p == g == 0 for p, g in zip(pred, gold))
        fp = sum(p == 1 and g == 0 for p, g in zip(pred, gold))
        fn = sum(p == 0 and g == 1 for p, g in zip(pred, gold))
        denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert matthews_corrcoef(pred, gold) == pytest.approx((tp * tn - fp * fn) / denominator)
        assert f1_score(pred, gold) == pytest.approx(tp / (tp + (fp + fn) / 2))
    assert matthews_corrcoef([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0], [1, 0, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # one predicted class: no correlation, not NaN
    assert f1_score([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="as many predictions"):
        accuracy([1], [1, 0])


# ------------------------------------------------------------------------------------------------ task files

GLUE_LAYOUTS = {
    # name: (train.tsv: header and two rows of two classes, dev file name, dev file,
    #        (text, text_b, label) of the first training example)
    "SST-2": ("sentence\tlabel\nit works \t1\nit fails\t0\n", "dev.tsv", "sentence\tlabel\nso so\t0\n",
              ("it works ", None, "1")),
    "MRPC": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tone\ttwo\n0\t1\t2\tsix\tten\n",
             "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tthree\tfour\n", ("one", "two", "1")),
    "QQP": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n5\t1\t2\twhy?\thow?\t0\n6\t3\t4\tx?\ty?\t1\n",
            "dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n6\t3\t4\twho?\twhom?\t1\n",
            ("why?", "how?", "0")),
    "QNLI": ("index\tquestion\tsentence\tlabel\n0\twhat?\tthat.\tentailment\n1\tq\ts\tnot_entailment\n", "dev.tsv",
             "index\tquestion\tsentence\tlabel\n0\twhere?\there.\tnot_entailment\n", ("what?", "that.", "entailment")),
    "RTE": ("index\tsentence1\tsentence2\tlabel\n0\ta \"quoted\" premise\thypothesis\tnot_entailment\n"
            "1\tp\th\tentailment\n", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tp\th\tentailment\n",
            ("a \"quoted\" premise", "hypothesis", "not_entailment")),
    "CoLA": ("gj04\t1\t\tOur friends won't buy this.\ngj04\t0\t*\tThey drank the pub.\n", "dev.tsv",
             "cj99\t0\t*\tThe more does Bill smoke.\n", ("Our friends won't buy this.", None, "1")),
    "MNLI": ("index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label\n0\t1\t2\tfic\tp\th\tneutral\n"
             "1\t1\t2\tfic\tp2\th2\tcontradiction\n", "dev_matched.tsv",
             "index\tgenre\tsentence1\tsentence2\tlabel1\tlabel2\tgold_label\n0\tfic\tp3\th3\tneutral\tneutral\t"
             "neutral\n", ("p", "h", "neutral")),
}


@pytest.mark.parametrize("layout", sorted(GLUE_LAYOUTS))
def test_glue_layouts_are_recognised(layout, tmp_path):
    train, dev_name, dev, (text, text_b, label) = GLUE_LAYOUTS[layout]
    (tmp_path / "train.tsv").write_text(train, encoding="utf-8")
    (tmp_path / dev_name).write_text(dev, encoding="utf-8")
    data = load_task(tmp_path)
    first = data.train[0]
    assert (first.text, first.text_b, first.label) == (text, text_b, label)
    assert first.where == f"{tmp_path / 'train.tsv'}:{1 if layout == 'CoLA' else 2}"
    assert len(data.train) == 2 and len(data.dev) == 1 and data.is_pair == (text_b is not None)


def test_jsonl_tasks_keep_integer_and_string_labels_as_one_class(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": "0"}\n')
    (tmp_path / "dev.jsonl").write_text('{"text": "c", "label": "1"}\n')
    data = load_task(tmp_path)
    assert data.labels == ("0", "1") and not data.is_pair
    assert data.train[1].where == f"{tmp_path / 'train.jsonl'}:3"


MALFORMED = {
    # name: ({file: contents}, fragments the error must contain; "{dir}" is the task folder)
    "wrong column count": ({"train.tsv": "sentence\tlabel\ngood\t1\nno tab here\nbad\t0\n",
                            "dev.tsv": "sentence\tlabel\nx\t1\n"},
                           ["{dir}/train.tsv:3", "1 tab-separated columns, expected 2", "--skip-malformed"]),
    "extra column": ({"train.tsv": "sentence\tlabel\ngood\t1\nbad\t0\ta tab\t1\n",
                      "dev.tsv": "sentence\tlabel\nx\t1\n"},
                     ["{dir}/train.tsv:3", "4 tab-separated columns, expected 2"]),
    "missing label column": ({"train.tsv": "sentence\tpolarity\ngood\t1\n", "dev.tsv": "sentence\tlabel\nx\t1\n"},
                             ["{dir}/train.tsv:1", "include no label column", "`sentence` + `label`"]),
    "missing text column": ({"train.tsv": "premise\tlabel\ngood\t1\n", "dev.tsv": "sentence\tlabel\nx\t1\n"},
                            ["{dir}/train.tsv:1", "include no text column", "`sentence1` + `sentence2` + `label`"]),
    "regression": ({"train.tsv": "sentence1\tsentence2\tscore\na\tb\t3.2\n", "dev.tsv": "x"},
                   ["{dir}/train.tsv:1", "regression"]),
    "empty file": ({"train.tsv": "", "dev.tsv": "sentence\tlabel\nx\t1\n"}, ["{dir}/train.tsv is empty"]),
    "header only": ({"train.tsv": "sentence\tlabel\ngood\t1\nbad\t0\n", "dev.tsv": "sentence\tlabel\n\n"},
                    ["{dir}/dev.tsv has a header but no examples"]),
    "empty label": ({"train.tsv": "sentence\tlabel\ngood\t1\nbad\t \n", "dev.tsv": "sentence\tlabel\nx\t1\n"},
                    ["{dir}/train.tsv:3", "label is empty"]),
    "unseen dev label": ({"train.tsv": "sentence\tlabel\ngood\t1\nbad\t0\n",
                          "dev.tsv": "sentence\tlabel\nx\t1\ny\t0\nz\t2\n"},
                         ["{dir}/dev.tsv:4", "label '2' never occurs in the training examples", "0, 1"]),
    "one class": ({"train.tsv": "sentence\tlabel\ngood\t1\nfine\t1\n", "dev.tsv": "sentence\tlabel\nx\t1\n"},
                  ["all have label '1'", "at least two classes"]),
    "not utf-8": ({"train.tsv": b"sentence\tlabel\ngood\t1\nna\xefve\t0\n", "dev.tsv": "sentence\tlabel\nx\t1\n"},
                  ["{dir}/train.tsv:3", "not valid UTF-8", "byte 0xef at column 3"]),
    "no dev": ({"train.tsv": "sentence\tlabel\ngood\t1\nbad\t0\n"}, ["{dir} has train.tsv but no dev.tsv"]),
    "no train": ({"dev.tsv": "sentence\tlabel\nx\t1\n"}, ["{dir} has no train.tsv or train.jsonl"]),
    "both formats": ({"train.tsv": "", "train.jsonl": ""}, ["both train.tsv and train.jsonl"]),
    "bad json": ({"train.jsonl": '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', "dev.jsonl": ""},
                 ["{dir}/train.jsonl:2", "not valid JSON"]),
    "json without label": ({"train.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "class": 0}\n',
                            "dev.jsonl": ""}, ["{dir}/train.jsonl:2", "`label`", "['class', 'text']"]),
    "float label": ({"train.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n', "dev.jsonl": ""},
                    ["{dir}/train.jsonl:2", "label 0.5 is not a class"]),
    "pair and single mixed": ({"train.jsonl": '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n',
                               "dev.jsonl": '{"text": "c", "text_b": "d", "label": 1}\n'},
                              ["{dir}/train.jsonl:1 has one sentence but {dir}/dev.jsonl:1 has a pair"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_task_files_are_refused_naming_file_and_line(case, tmp_path):
    files, fragments = MALFORMED[case]
    for name, contents in files.items():
        path = tmp_path / name
        path.write_bytes(contents) if isinstance(contents, bytes) else path.write_text(contents, encoding="utf-8")
    with pytest.raises((TaskFormatError, FileNotFoundError)) as info:
        load_task(tmp_path)
    for fragment in fragments:
        assert fragment.format(dir=tmp_path) in str(info.value)


def test_skip_malformed_drops_rows_with_the_wrong_column_count_and_lists_them(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nno tab here\nbad\t0\nx\ty\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    data = load_task(tmp_path, skip_malformed=True)
    assert [ex.text for ex in data.train] == ["good", "bad"]
    assert data.skipped == (f"{tmp_path / 'train.tsv'}:3", f"{tmp_path / 'train.tsv'}:5")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nbroken\n")
    with pytest.raises(TaskFormatError, match="dev.tsv has no well-formed rows"):
        load_task(tmp_path, skip_malformed=True)


def test_in_memory_tasks_name_the_example():
    with pytest.raises(TaskFormatError, match=r"dev\[1\]: label 'maybe' never occurs"):
        TaskData(train=[Example("a", "yes"), Example("b", "no")], dev=[Example("c", "no"), Example("d", "maybe")])
    with pytest.raises(TaskFormatError, match="has no dev examples"):
        TaskData(train=[Example("a", 1), Example("b", 0)], dev=[])
    with pytest.raises(TaskFormatError, match=r"train\[1\] is a dict, not an Example"):
        TaskData(train=[Example("a", 1), {"text": "b", "label": 0}], dev=[Example("c", 1)])


def test_settings_are_checked_before_any_work(model_dir, word_groups, tmp_path):
    with pytest.raises(ValueError, match="max_seq_len 128 exceeds the model's max_position_embeddings 64"):
        finetune(model_dir, write_sst2(tmp_path / "sst", word_groups, 8, 4), max_seq_len=128)
    with pytest.raises(ValueError) as info:
        finetune(model_dir, tmp_path / "nowhere", epochs=0, lr=-1.0)
    assert "epochs must be a positive integer" in str(info.value) and "lr must be positive" in str(info.value)


# ------------------------------------------------------------------------------------------------ the command

def test_cli_prints_one_json_line(model_dir, word_groups, tmp_path):
    task = write_sst2(tmp_path / "sst", word_groups, n_train=48, n_dev=16)
    with open(task / "train.tsv", "a") as f:
        f.write("a row\twith a tab\t1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bertscale.cli", "finetune", "--model", str(model_dir), "--task", str(task),
         "--from-scratch", "--epochs", "1", "--max-seq-len", "32", "--batch-size", "16", "--skip-malformed"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    result = json.loads(lines[0])
    assert result["init"] == "scratch" and result["epochs"] == 1 and result["dev_examples"] == 16
    assert result["skipped_rows"] == 1 and result["train_examples"] == 48
    assert "train.tsv:50" in proc.stderr  # the warning names the dropped row
    assert {"accuracy", "mcc", "f1", "positive_label"} <= set(result)
    assert "epoch 1/1" in proc.stderr  # progress goes to stderr, never into the JSON line


def test_cli_reports_a_bad_task_as_an_error(model_dir, tmp_path, capsys):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    assert cli.main(["finetune", "--model", str(model_dir), "--task", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"bertscale finetune: error: {tmp_path} has train.tsv but no dev.tsv" in err


def test_cli_defaults_are_the_library_defaults():
    args = cli.build_parser().parse_args(["finetune", "--model", "m", "--task", "t"])
    for name, parameter in inspect.signature(finetune).parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            assert getattr(args, name) == parameter.default, name
