"""Split a sweep over processes, GPUs or machines (`shard="i/n"`) and merge the parts exactly.

A sweep is a list of work units (a batch of questions, one inversion setting, a batch of corpus sentences). Shard
i of n takes units i, i + n, i + 2n, ..., each unit computed exactly as in a single run (same batches, same
seeds), so the merged parts equal one run. Under `torchrun` or `accelerate launch` every process finds its shard
in the environment (`RANK`, `WORLD_SIZE`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from .storage import atomic_path

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse(shard: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n); None -> (0, 1), the whole sweep."""
    if shard is None:
        return 0, 1
    match = _SHARD.match(str(shard))
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ValueError(f"shard must read 'i/n' with 0 <= i < n (e.g. '0/4'), got {shard!r}")
    return int(match[1]), int(match[2])


def units(n_units: int, shard: str | None) -> list[int]:
    """The unit indices shard i of n computes: i, i + n, i + 2n, ..."""
    i, n = parse(shard)
    return list(range(i, n_units, n))


def batches(items: list, batch_size: int, shard: str | None = None):
    """(batch index, the items of that batch) for every batch of `batch_size` items that this shard computes
    (every batch without a shard): the one batching loop of the chapters' sweeps."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    for b in units(-(-len(items) // batch_size), shard):
        yield b, items[b * batch_size:(b + 1) * batch_size]


def from_environment() -> str | None:
    """This process's shard under torchrun / accelerate launch ('RANK/WORLD_SIZE'), or None when run alone."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    return f"{rank}/{world}" if rank is not None and world is not None else None


def part_path(folder: str | Path, name: str, shard: str | None, suffix: str = ".parquet") -> Path:
    i, n = parse(shard)
    return Path(folder) / f"{name}.part-{i}-of-{n}{suffix}"


def part_paths(folder: str | Path, name: str, suffix: str = ".parquet") -> list[Path]:
    """Every part of a sharded result, checked complete: all n parts of one split, none missing."""
    found = sorted(Path(folder).glob(f"{name}.part-*-of-*{suffix}"))
    splits = {int(re.search(r"-of-(\d+)", p.name)[1]) for p in found}
    if len(splits) != 1:
        raise ValueError(f"{folder} holds {'no parts' if not splits else f'parts of {len(splits)} splits'} of "
                         f"{name!r}: run every shard of one split (same n) into the folder, then merge")
    n = splits.pop()
    expected = [part_path(folder, name, f"{i}/{n}", suffix) for i in range(n)]
    if missing := [p.name for p in expected if not p.exists()]:
        raise ValueError(f"cannot merge {name!r}: missing {', '.join(missing)}; run those shards first")
    return expected


def save_table(table: pd.DataFrame, folder: str | Path, name: str, shard: str | None) -> Path:
    """One shard's records as parquet, written atomically."""
    path = part_path(folder, name, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def load_tables(folder: str | Path, name: str) -> pd.DataFrame:
    """All parts of a sharded table, concatenated in shard order."""
    return pd.concat([pd.read_parquet(p) for p in part_paths(folder, name)], ignore_index=True)
