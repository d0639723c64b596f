#!/usr/bin/env python3
"""Print a shard directory's manifest and the first samples of a split as text.

    python tools/inspect_shards.py data/seq128 --tokenizer data/tokenizer --samples 3

Shows each sample's segment A, segment B and next-sentence label, and the masked input of the
epoch-0 mask, so you can see exactly what the model is trained on.
"""

from __future__ import annotations

import argparse
import itertools
import json

import webdataset as wds

from bertscale.loader import decode_sample
from bertscale.masking import IGNORE_INDEX, mask_tokens
from bertscale.shards import load_manifest, shard_paths
from bertscale.tokenizer import load_tokenizer, tokenizer_info


def inspect(data_dir: str, tokenizer_dir: str, split: str = "train", samples: int = 3, seed: int = 0) -> None:
    info = tokenizer_info(tokenizer_dir)
    manifest = load_manifest(data_dir, expect_fingerprint=info.fingerprint)
    tok = load_tokenizer(tokenizer_dir)
    summary = {k: v for k, v in manifest.items() if k != "splits"}
    summary["splits"] = {name: {"shards": len(s["shards"]), "samples": s["samples"]}
                         for name, s in manifest["splits"].items()}
    print(json.dumps(summary, indent=2))
    stream = wds.DataPipeline(wds.SimpleShardList(shard_paths(manifest, data_dir, split)), wds.tarfile_to_samples())
    for raw in itertools.islice(stream, samples):
        sample_id, ids, a_len, nsp = decode_sample(raw, manifest["dtype"])
        masked, labels = mask_tokens(ids, seed=seed, epoch=0, sample_id=sample_id, vocab_size=info.vocab_size,
                                     mask_id=info.mask_id, special_ids=info.special_ids)
        print(f"\n--- sample {sample_id} ({len(ids)} tokens, {'random B' if nsp else 'B follows A'})")
        print("A:", tok.decode(ids[1:a_len - 1].tolist()))
        print("B:", tok.decode(ids[a_len:-1].tolist()))
        print("masked:", " ".join(tok.id_to_token(int(t)) for t in masked))
        print("targets:", " ".join(tok.id_to_token(int(t)) for t in labels if t != IGNORE_INDEX))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="directory written by `bertscale shards`")
    parser.add_argument("--tokenizer", required=True, help="directory written by `bertscale tokenizer`")
    parser.add_argument("--split", default="train", choices=["train", "valid"])
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()
    inspect(args.data, args.tokenizer, args.split, args.samples)


if __name__ == "__main__":
    main()
