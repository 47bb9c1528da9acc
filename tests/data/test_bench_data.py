"""`cxrfm bench data`'s arithmetic: the CPU accounting across processes that come and go, and the table of
medians over interleaved repeats (the measurements themselves are the bench's job, not a test's)."""

from __future__ import annotations

from cxrfm.bench.data import _cpu_used, table


def test_cpu_of_processes_started_in_between_counts_from_zero_and_never_goes_negative():
    before = {0: 10.0, 101: 5.0, 102: 7.0}
    after = {0: 12.5, 101: 6.0, 103: 2.0}  # 102 exited (its last second is lost), 103 started
    own, loader = _cpu_used(before, after)
    assert own == 2.5 and loader == 1.0 + 2.0


def _row(source, loader, sps, wait=0.01, step=300.0, repeat=0):
    return {"source": source, "loader": loader, "repeat": repeat, "samples_per_s": sps, "data_wait": wait,
            "step_ms": step, "own_cpu_ms_per_sample": 30.0, "loader_cpu_ms_per_sample": 4.0}


def test_table_shows_each_loaders_median_and_its_ratio_to_the_plain_loader_of_the_same_source():
    rows = [_row("local", "ray", 30.0), _row("local", "webdataset", 20.0),
            _row("local", "ray", 10.0, repeat=1), _row("local", "webdataset", 25.0, repeat=1),
            _row("local", "ray", 28.0, repeat=2), _row("local", "webdataset", 22.0, repeat=2),
            _row("store", "ray", 9.0)]  # no plain loader measured from the store: no ratio
    lines = table(rows).splitlines()
    assert lines[2].startswith("| local | ray | 3 | 28.0 | 1.27x | 1.0% | 300 | 4 |"), lines[2]
    assert lines[3].startswith("| local | webdataset | 3 | 22.0 | 1.00x |"), lines[3]
    assert lines[4].startswith("| store | ray | 1 | 9.0 | - |"), lines[4]
