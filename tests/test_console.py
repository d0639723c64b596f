"""The console without a terminal: progress as lines, third-party noise filtered in this process too."""

from __future__ import annotations

import os

from bertscale.console import Progress, filtered_output


class Clock:
    """A settable clock: the progress lines' timing, not the machine's speed, is under test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_come_between_interval_lines_when_the_console_is_quiet():
    clock = Clock()
    progress = Progress("phase1", start=100, end=900, step=300, every_s=30, clock=clock)  # resumed at step 300
    clock.now += 10
    assert progress.update(301) is None  # not quiet for long enough
    clock.now += 25
    line = progress.update(340)
    assert line == "phase1: step 240/800 (30%), 1.14 steps/s, about 8m 10s left in the phase"
    clock.now += 20
    assert progress.update(350) is None  # 20 s since the last line
    clock.now += 5
    assert progress.update(360, logged=True) is None  # an interval line was printed: the wait restarts
    clock.now += 29
    assert progress.update(380) is None
    clock.now += 2
    assert progress.update(381).startswith("phase1: step 281/800 (35%), 0.89 steps/s, about 9m 43s left")
    clock.now += 60
    assert progress.update(900) is None  # the phase's last step has its own line


def test_filtered_output_drops_noise_written_to_the_file_descriptors(capfd):
    with filtered_output():
        os.write(1, b"Processing zero checkpoint '/x/step00000004'\nkept on stdout\n")
        # a progress bar drawn over itself (tqdm off a terminal), then a line that matters
        os.write(2, b"Loading checkpoint shards:   0%|  | 0/2\rLoading checkpoint shards: 100%| | 2/2\n")
        os.write(2, b"kept on stderr\n")
    out, err = capfd.readouterr()
    assert out == "kept on stdout\n" and err == "kept on stderr\n"


def test_shard_building_off_a_terminal_prints_progress_lines_not_carriage_returns(tmp_path, capsys):
    from bertscale.shards import build_shards
    from bertscale.tokenizer import train_tokenizer
    from conftest import write_generated_corpus

    corpus = write_generated_corpus(tmp_path / "corpus.txt", n_docs=60, seed=4)
    tok = train_tokenizer([corpus], vocab_size=200, out_dir=tmp_path / "tok", show_progress=False)
    capsys.readouterr()
    build_shards([corpus], tok, seq_len=64, out_dir=tmp_path / "d64", samples_per_shard=50, seed=1,
                 valid_fraction=0.1, show_progress=True)  # as `bertscale shards` and the demo show it
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [line for line in err.splitlines() if line.startswith("tokenize: ")]
    assert [line for line in err.splitlines() if line.startswith("pair: ")]
