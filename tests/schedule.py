"""The order `make test` hands tests to pytest-xdist: the long ones first, balanced between the workers.

`--dist worksteal` gives each of n workers one contiguous 1/n of the collection, in order, and an idle worker then
steals the tail of the busiest one's queue. Collected in file order, the MIMIC seeds and chapter 4's phenomenon
test could sit in one worker's share or start last, and one core idled for minutes at the end. Here each worker's
share starts with its long tests (longest first, assigned greedily to the least loaded share) and ends with short
ones, which are what stealing moves. Durations come from `tests/durations.json`, a measured run
(`pytest --record-durations tests/durations.json`); a test it does not know counts as short, unless it is
marked `phenomenon` or `slow` (conftest counts those as long). Only the order changes: every test still runs
exactly once.
"""
from __future__ import annotations

LONG_S = 5.0  # a test at least this long moves to the front of a share; shorter ones keep their file order


def balanced_order(nodeids: list[str], seconds: dict[str, float], workers: int) -> list[int]:
    """Indices into `nodeids`: `workers` contiguous shares of len // workers items (the last takes the rest), the
    long tests spread over them by longest-processing-time-first, each share long tests first."""
    n = len(nodeids)
    sizes = [n // workers] * (workers - 1) + [n - n // workers * (workers - 1)]
    shares: list[list[int]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    by_cost = sorted(range(n), key=lambda i: -seconds.get(nodeids[i], 0.0))  # stable: ties keep file order
    long_ones = [i for i in by_cost if seconds.get(nodeids[i], 0.0) >= LONG_S]
    for i in long_ones:
        open_shares = [w for w in range(workers) if len(shares[w]) < sizes[w]]
        w = min(open_shares, key=lambda s: load[s])
        shares[w].append(i)
        load[w] += seconds[nodeids[i]]
    placed = set(long_ones)
    short_ones = [i for i in range(n) if i not in placed]  # file order: a module's tests stay together
    for w in range(workers):
        take = sizes[w] - len(shares[w])
        shares[w] += short_ones[:take]
        short_ones = short_ones[take:]
    return [i for share in shares for i in share]
