#!/usr/bin/env python3
"""Print a shard directory's manifest and the first samples of a split as text.

    python tools/inspect_shards.py data/seq128 --tokenizer data/tokenizer --samples 3
    python tools/inspect_shards.py https://host/data/seq128 --tokenizer data/tokenizer

Shows the build report, then each sample's segment A, segment B and pair label, and the masked
input of the epoch-0 mask, so you can see exactly what the model is trained on. Shards are read
(and checked) by ``shard_format.read_shard``, the loader's reader.
"""

from __future__ import annotations

import argparse
import json

from bertscale.masking import IGNORE_INDEX, mask_tokens
from bertscale.shard_format import SampleRules, load_manifest, read_shard, shard_paths
from bertscale.tokenizer import load_tokenizer, tokenizer_info


def inspect(data_dir: str, tokenizer_dir: str, split: str = "train", samples: int = 3, seed: int = 0) -> None:
    info = tokenizer_info(tokenizer_dir)
    manifest = load_manifest(data_dir, expect_fingerprint=info.fingerprint)
    tok = load_tokenizer(tokenizer_dir)
    summary = {k: v for k, v in manifest.items() if k not in ("splits", "build")}
    summary["splits"] = {name: {"shards": len(s["shards"]), "samples": s["samples"]}
                         for name, s in manifest["splits"].items()}
    print(json.dumps(summary, indent=2))
    rules = SampleRules.of(manifest)
    shown = 0
    for url, entry in zip(shard_paths(manifest, data_dir, split), manifest["splits"][split]["shards"]):
        shard = read_shard(url, rules, entry)
        for i in range(min(len(shard), samples - shown)):
            sample_id, ids, a_len, label = shard.sample(i)
            masked, labels = mask_tokens(ids, seed=seed, epoch=0, sample_id=sample_id, vocab_size=info.vocab_size,
                                         mask_id=info.mask_id, special_ids=info.special_ids)
            kind = ("random B" if label else "B follows A") if manifest.get("pair_task", "nsp") == "nsp" else \
                ("swapped" if label else "in order")
            print(f"\n--- sample {sample_id} ({len(ids)} tokens, {kind})")
            print("A:", tok.decode(ids[1:a_len - 1].tolist()))
            print("B:", tok.decode(ids[a_len:-1].tolist()))
            print("masked:", " ".join(tok.id_to_token(int(t)) for t in masked))
            print("targets:", " ".join(tok.id_to_token(int(t)) for t in labels if t != IGNORE_INDEX))
            shown += 1
        if shown >= samples:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="directory (or URL prefix) written by `bertscale shards`")
    parser.add_argument("--tokenizer", required=True, help="directory written by `bertscale tokenizer`")
    parser.add_argument("--split", default="train", choices=["train", "valid"])
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()
    inspect(args.data, args.tokenizer, args.split, args.samples)


if __name__ == "__main__":
    main()
