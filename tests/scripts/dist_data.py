"""Launched by tests/test_data.py with ``torchrun --nproc_per_node 2``: each rank loads a streamed dataset
with ``split_by_node=True`` and writes the blocks it got to ``<out>/blocks_rank<r>.json``."""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from hf_chts.data import load_lm_data


def main() -> None:
    data_file, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    import datasets

    docs = datasets.load_dataset("json", data_files=data_file, split="train", cache_dir=f"{out}/cache{rank}")
    stream = docs.to_iterable_dataset(num_shards=4)
    lm = load_lm_data(
        stream,
        tokenizer_vocab_size=300,
        max_seq_length=16,
        split_by_node=True,
        cache_dir=f"{out}/cache{rank}",
    )
    blocks = [row["input_ids"].tolist() for row in lm.train_dataset]
    with open(f"{out}/blocks_rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world_size": dist.get_world_size(), "blocks": blocks}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
