"""The order `make test` gives pytest-xdist (`schedule.py`): a permutation, long tests first and balanced."""
from schedule import balanced_order


def test_the_long_tests_start_each_workers_share_and_balance_the_load():
    ids = [f"t{i}" for i in range(10)]
    seconds = {"t8": 400.0, "t9": 420.0, "t1": 130.0, "t5": 110.0, "t2": 0.2}
    order = balanced_order(ids, seconds, workers=2)
    assert sorted(order) == list(range(10))  # every test once
    first, second = order[:5], order[5:]  # worksteal hands each worker one contiguous half
    assert {first[0], second[0]} == {8, 9}  # the two longest start at once, on different workers
    loads = [sum(seconds.get(ids[i], 0) for i in share) for share in (first, second)]
    assert abs(loads[0] - loads[1]) <= 110  # LPT: 420 + 110 against 400 + 130 (file order would put all in one)
    short = [i for i in order if ids[i] not in seconds or seconds[ids[i]] < 5]
    assert short == sorted(short)  # short tests keep their file order, so a module's tests stay together


def test_without_durations_the_order_is_the_file_order():
    ids = [f"t{i}" for i in range(7)]
    assert balanced_order(ids, {}, workers=2) == list(range(7))
    assert balanced_order(ids, {"t3": 60.0}, workers=1) == [3, 0, 1, 2, 4, 5, 6]
