"""The `bertscale` command: thin argument parsing around library functions, one verb per stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys

EPILOG = "Run `bertscale VERB --help` for a verb's options. Start with `make demo` (see README.md)."


def _tokenizer(args: argparse.Namespace) -> int:
    from bertscale.tokenizer import tokenizer_info, train_tokenizer

    out = train_tokenizer(args.input, vocab_size=args.vocab_size, out_dir=args.out, lowercase=not args.cased,
                          min_frequency=args.min_frequency, documents=args.documents)
    info = tokenizer_info(out)
    print(f"wrote tokenizer to {out} ({info.vocab_size} entries, fingerprint {info.fingerprint})")
    if info.vocab_size < args.vocab_size:
        print(f"note: the vocabulary has {info.vocab_size} entries, fewer than the {args.vocab_size} asked: the "
              f"corpus has no more pairs seen at least --min-frequency {args.min_frequency} times (a larger corpus, "
              "or a lower --min-frequency, gives more)")
    return 0


def _shards(args: argparse.Namespace) -> int:
    from bertscale.shards import build_shards, describe_build, shard_dirs

    result = build_shards(args.input, args.tokenizer, seq_len=args.seq_len, out_dir=args.out,
                          samples_per_shard=args.samples_per_shard, seed=args.seed,
                          valid_fraction=args.valid_fraction, short_seq_prob=args.short_seq_prob,
                          workers=args.workers, sentence_order=args.sentence_order,
                          show_progress=not args.no_progress, documents=args.documents)
    manifests = {args.seq_len[0]: result} if len(args.seq_len) == 1 else result
    for seq_len, out in shard_dirs(args.out, args.seq_len).items():
        print("\n".join(describe_build(manifests[seq_len], out)))
        for warning in manifests[seq_len]["report"]["warnings"]:
            print(f"warning: {warning}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    if args.help_config:
        from bertscale.config import describe

        print(describe())
        return 0
    if not args.config:
        print("bertscale pretrain: --config FILE is required (see configs/ and README.md)", file=sys.stderr)
        return 2
    if args.estimate and not args.dry_run:
        print("bertscale pretrain: --estimate goes with --dry-run (it times a step instead of training)",
              file=sys.stderr)
        return 2
    from launcher.launch import RunStopped, pretrain

    try:
        out = pretrain(args.config, args.set, dry_run=args.dry_run, resume=args.resume, estimate=args.estimate)
    except RunStopped as stopped:  # a requested stop, not a failure: the ranks saved first
        print(f"bertscale pretrain: {stopped}")
        return 0
    if not args.dry_run:
        print(f"training finished; checkpoints in {out / 'checkpoints'}, TensorBoard events in {out / 'tensorboard'}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from bertscale.convert import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out, tag=args.tag, fmt=args.format)
    print(f"wrote {'Hugging Face model' if args.format == 'hf' else 'PyTorch state dict'} to {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from bertscale.evaluate import evaluate, evaluate_text

    if args.text:
        results = evaluate_text(args.model, args.text, seq_len=args.seq_len, batch_size=args.batch_size,
                                seed=args.seed, mask_prob=args.mask_prob, max_predictions=args.max_predictions,
                                whole_word_masking=args.whole_word_masking, documents=args.documents)
    else:
        results = evaluate(args.model, args.data, split=args.split, batch_size=args.batch_size,
                           max_batches=args.max_batches, seed=args.seed, mask_prob=args.mask_prob,
                           max_predictions=args.max_predictions, whole_word_masking=args.whole_word_masking)
    print(json.dumps(results))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from bertscale.finetune import finetune

    results = finetune(args.model, args.task, from_scratch=args.from_scratch, epochs=args.epochs, lr=args.lr,
                       batch_size=args.batch_size, max_seq_len=args.max_seq_len, warmup=args.warmup,
                       weight_decay=args.weight_decay, seed=args.seed, device=args.device,
                       skip_malformed=args.skip_malformed, pooling=args.pooling)
    print(json.dumps(results))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from bertscale.demo import run_demo

    summary = run_demo(args.corpus, args.out, steps1=args.steps1, steps2=args.steps2, ranks=args.ranks,
                       overrides=args.set, documents=args.documents)
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bertscale.corpus import DOCUMENT_MODES
    from bertscale.demo import DEFAULT_STEPS

    parser = argparse.ArgumentParser(
        prog="bertscale", epilog=EPILOG,
        description="Distributed BERT pretraining: tokenizer -> shards -> DeepSpeed ZeRO + LAMB -> Hugging Face.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser("tokenizer", formatter_class=fmt, help="train a BERT WordPiece tokenizer",
                       description="Train a BERT WordPiece tokenizer (BERT normalisation, [PAD] [UNK] [CLS] [SEP] "
                                   "[MASK]); writes tokenizer.json, vocab.txt and the files "
                                   "transformers.BertTokenizerFast.from_pretrained needs.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt, .txt.gz, .jsonl, .jsonl.gz files or directories of them")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, e.g. 30522")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: lowercase)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair frequency for a merge")
    p.add_argument("--documents", default="blank-lines", choices=DOCUMENT_MODES,
                   help="how a .txt file splits into documents, as for `bertscale shards` (give both verbs the same "
                        "mode). The vocabulary does not depend on it; at blank lines, a corpus that looks written in "
                        "paragraphs gets a warning")
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("shards", formatter_class=fmt, help="build WebDataset shards of pretraining samples",
                       description="Turn documents into BERT sentence-pair samples with next-sentence labels and "
                                   "write them as WebDataset tar shards (OUT/train/, OUT/valid/) with a manifest "
                                   "OUT/index.json. Several --seq-len values tokenize once and write OUT/seq{L}/ "
                                   "each. Random B segments come from any other document of the corpus; shards "
                                   "hold exactly --samples-per-shard samples whatever the number of input files, "
                                   "and do not depend on --workers. Rerunning an interrupted build continues it; "
                                   "rerunning a finished one does nothing. Text files hold documents separated by "
                                   "blank lines (--documents file: one document per file, for text written in "
                                   "paragraphs); jsonl files hold one document per line in a 'text' field; a "
                                   "damaged .gz is used up to the damage, named in a warning and in index.json.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="corpus files or directories")
    p.add_argument("--tokenizer", required=True, help="directory written by `bertscale tokenizer`")
    p.add_argument("--seq-len", type=int, nargs="+", required=True,
                   help="sequence length(s), e.g. 128 or 128 512 (one pass for all)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--samples-per-shard", type=int, default=10000, help="samples per tar file")
    p.add_argument("--seed", type=int, default=12345, help="seed for pairing, NSP negatives and the split")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="fraction of documents held out")
    p.add_argument("--short-seq-prob", type=float, default=0.1, help="probability of a shorter random target length")
    p.add_argument("--sentence-order", action="store_true",
                   help="sentence-order prediction (swapped segments) instead of next-sentence prediction")
    p.add_argument("--documents", default="blank-lines", choices=DOCUMENT_MODES,
                   help="how a .txt file splits into documents: at blank lines (Google's one-sentence-per-line "
                        "format; a corpus that looks written in paragraphs gets a warning) or one per file")
    p.add_argument("--workers", type=int, default=None, help="build processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_shards)

    p = sub.add_parser("pretrain", formatter_class=fmt, help="run all phases through the deepspeed launcher",
                       description="Resolve the run configuration (file < --set overrides), check it against the "
                                   "data and the machine, and train every phase through the `deepspeed` "
                                   "launcher. Re-running the same command continues from the latest complete "
                                   "checkpoint. Exit status 0: every phase finished, or SIGTERM/SIGINT stopped the "
                                   "run (the ranks save first); 1: a rank failed (named) or the run was refused; a "
                                   "second launcher on the same run.out_dir is refused. The console's lines are "
                                   "appended to OUT/train.log. With distributed.master_port unset, a single-node "
                                   "run picks a free port.")
    p.add_argument("--config", help="run configuration (TOML, or a run's resolved OUT/run_config.json); see configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set train.log_interval=5 --set phases.phase1.steps=100")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything (DeepSpeed JSON, data, resume) and print the model's parameter count, each "
                        "phase's samples, tokens and epochs of its shards, where the ranks' environment comes from "
                        "(the launcher's variables merged with ~/.deepspeed_env), its deepspeed command and batch "
                        "plan, starting nothing")
    p.add_argument("--estimate", action="store_true",
                   help="with --dry-run: time one real step of the model per phase on this machine and print each "
                        "phase's estimated time (an estimate: leaves out data loading, communication, warm-up)")
    p.add_argument("--resume", default="auto", metavar="auto|never|PATH",
                   help="auto: continue from the latest complete checkpoint of run.out_dir; never: start fresh "
                        "(refused if run.out_dir has checkpoints); PATH: continue from that checkpoint")
    p.add_argument("--help-config", action="store_true", help="list every configuration key with its default")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("convert", formatter_class=fmt, help="DeepSpeed checkpoint -> Hugging Face weights",
                       description="Consolidate a sharded DeepSpeed ZeRO checkpoint and write config.json, "
                                   "model.safetensors and the tokenizer files (loads in transformers as "
                                   "BertForPreTraining).")
    p.add_argument("--checkpoint", required=True,
                   help="a run's checkpoints/ directory (latest complete one is used) or one step directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tag", default=None, help="a checkpoint tag such as step00000300 (default: latest)")
    p.add_argument("--format", default="hf", choices=["hf", "torch"],
                   help="hf: config.json + model.safetensors + tokenizer; torch: model.pt state dict + config.json")
    p.set_defaults(func=_convert)

    p = sub.add_parser("eval", formatter_class=fmt, help="MLM/NSP accuracy of a converted model",
                       description="Masked-LM loss and accuracy of a converted model on held-out shards (--data, "
                                   "with NSP accuracy) or raw text files (--text, no shards needed), beside what "
                                   "a unigram fitted on the training split of --data scores on the same positions "
                                   "(accuracy: always its most frequent token; loss: its add-one smoothed "
                                   "cross-entropy; with --text, nothing to fit on: the targets' own histogram, "
                                   "named in baseline_fitted_on), and the majority pair label (NSP); prints one "
                                   "JSON line. eval_mlm_accuracy counts only the positions "
                                   "replaced by [MASK]; eval_mlm_accuracy_all_positions also counts the 10% of "
                                   "targets left unchanged and the 10% replaced at random, as Google's "
                                   "masked_lm_accuracy does. Masks are made as training makes them, from --seed.")
    p.add_argument("--model", required=True, help="directory written by `bertscale convert`")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data",
                        help="directory written by `bertscale shards`, or a URL prefix serving one (http(s)://, "
                             "gs://, s3://, pipe:CMD with {} for the file)")
    source.add_argument("--text", nargs="+", metavar="PATH",
                        help="held-out .txt/.jsonl(.gz) files or directories, read as `bertscale shards` reads "
                             "them; each document is cut into consecutive windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=128, help="with --text: tokens per window, [CLS] and [SEP] included")
    p.add_argument("--documents", default="blank-lines", choices=DOCUMENT_MODES,
                   help="with --text: how a .txt file splits into documents, as for `bertscale shards`")
    p.add_argument("--split", default="valid", choices=["valid", "train"], help="with --data: which split")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    p.add_argument("--max-batches", type=int, default=None, help="with --data: stop after this many batches")
    p.add_argument("--seed", type=int, default=0, help="masking seed")
    p.add_argument("--mask-prob", type=float, default=0.15, help="fraction of tokens masked, as in training")
    p.add_argument("--max-predictions", type=int, default=None,
                   help="cap on masked positions per sample (default: training's, 20 at 128 and 80 at 512)")
    p.add_argument("--whole-word-masking", action="store_true",
                   help="mask whole words, as a run with data.whole_word_masking = true trains")
    p.set_defaults(func=_eval)

    p = sub.add_parser("finetune", formatter_class=fmt,
                       help="fine-tune a sentence(-pair) classifier: did pretraining help?",
                       description="Fine-tune the model's encoder with a classifier on [CLS] (as Hugging Face's "
                                   "BertForSequenceClassification; --pooling mean: on the mean of the last layer) "
                                   "on a labelled task, then print one JSON line of "
                                   "dev-set metrics: accuracy and Matthews correlation (CoLA's metric; multi-class "
                                   "for 3+ labels) always, and for two classes F1 of the positive class (the label "
                                   "sorting last: 1 of 0/1 labels, as GLUE scores MRPC and QQP). TASK is a folder "
                                   "with train.tsv and dev.tsv in GLUE's layout (SST-2, CoLA, MRPC, QQP, QNLI, RTE, "
                                   "WNLI, MNLI with dev_matched.tsv; columns recognised from the header) or "
                                   "train.jsonl and dev.jsonl (one object per line: text, optional text_b, label). "
                                   "Nothing is downloaded. Run it again with --from-scratch for the control: random "
                                   "weights of the same shape, same head, batches and seed. Seeded: the same "
                                   "command gives the same figures (bit for bit on CPU; on a GPU up to its "
                                   "non-deterministic kernels). Progress goes to stderr.")
    p.add_argument("--model", required=True, help="directory written by `bertscale convert` (weights + tokenizer)")
    p.add_argument("--task", required=True, help="folder with train.tsv + dev.tsv or train.jsonl + dev.jsonl")
    p.add_argument("--from-scratch", action="store_true",
                   help="the control: randomly initialised weights of the model's shape instead of its weights")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    p.add_argument("--lr", type=float, default=5e-5, help="peak AdamW learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--max-seq-len", type=int, default=128,
                   help="tokens per example including [CLS]/[SEP]; longer ones are cut, longest sentence first")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warmup (then linear decay)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases, LayerNorm)")
    p.add_argument("--seed", type=int, default=42, help="seed of the head, the scratch weights, shuffling, dropout")
    p.add_argument("--pooling", default="cls", choices=["cls", "mean"],
                   help="what the classifier reads: the pooled [CLS] output (as BERT and Hugging Face) or the mean of "
                        "the last layer over the real tokens")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when present")
    p.add_argument("--skip-malformed", action="store_true",
                   help="drop TSV rows with the wrong number of columns (as GLUE's reference scripts do for QQP) "
                        "instead of stopping; their count is skipped_rows in the output")
    p.set_defaults(func=_finetune)

    p = sub.add_parser("demo", formatter_class=fmt, help="the whole pipeline on a small corpus",
                       description="Tokenizer, shards, two-phase pretraining of a tiny BERT on DeepSpeed ranks, "
                                   "conversion and evaluation, in one command. Default corpus: the docstrings of "
                                   "this Python's standard library (nothing is downloaded).")
    p.add_argument("--corpus", nargs="+", default=None, metavar="PATH", help="use these files instead")
    p.add_argument("--documents", default="blank-lines", choices=DOCUMENT_MODES,
                   help="with --corpus: how a .txt file splits into documents, as for `bertscale shards` (the default "
                        "corpus holds one docstring per blank-line-separated block)")
    p.add_argument("--out", default="demo_out", help="output directory (hf/, tensorboard/, checkpoints/, ...)")
    p.add_argument("--steps1", type=int, default=DEFAULT_STEPS[0], help="optimizer steps at seq_len 128")
    p.add_argument("--steps2", type=int, default=DEFAULT_STEPS[1], help="optimizer steps at seq_len 512")
    p.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks (CPU processes or GPUs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo's run configuration (kept as OUT/run_config.json) as `pretrain --set` does, "
                        "e.g. --set train.log_interval=5 --set distributed.master_port=29600")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    from bertscale.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, ValueError, RuntimeError) as exc:
        print(f"bertscale {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the machine, not the input: a full disk, a missing permission
        print(f"bertscale {args.verb}: error: {_os_error(exc)}", file=sys.stderr)
        return 1


def _os_error(exc: OSError) -> str:
    """An operating-system error in words, with the file it concerns."""
    text = exc.strerror or str(exc)
    return f"{text} at {exc.filename}" if exc.filename else text


if __name__ == "__main__":
    sys.exit(main())
