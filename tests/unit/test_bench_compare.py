"""`make bench-compare`'s arithmetic (loadtest/bench_compare.py): the trees alternate who runs first, and
each case is judged on each side's median, so one slow run cannot decide "slower"."""

from __future__ import annotations

from loadtest.bench_compare import format_table, order, summarize


def _run(rps: float, p99: float) -> dict:
    return {"cases": {"chimera_c64": {"rows_per_s": rps, "p99_ms": p99}}}


def test_each_tree_runs_first_in_half_of_the_rounds() -> None:
    assert order(3) == ["old", "new", "new", "old", "old", "new"]
    firsts = [order(4)[2 * r] for r in range(4)]
    assert firsts.count("old") == firsts.count("new") == 2


def test_a_case_is_judged_on_medians_not_on_one_slow_run() -> None:
    runs = {"old": [_run(2000, 70), _run(1500, 100), _run(2100, 66)],
            "new": [_run(1200, 150), _run(2050, 68), _run(2080, 69)]}  # one slow new run
    row = summarize(runs)["chimera_c64"]
    assert row["old"]["median_rows_per_s"] == 2000 and row["new"]["median_rows_per_s"] == 2050
    assert row["rows_per_s_new_over_old"] == 2050 / 2000
    assert row["p99_new_over_old"] == 69 / 70
    assert row["new"]["rows_per_s"] == [1200, 2050, 2080]  # every run is kept
    assert "chimera_c64" in format_table(summarize(runs)) and "1.025" in format_table(summarize(runs))


def test_gateway_cases_are_also_read_against_their_anchor_in_the_same_run() -> None:
    """A run on a slow moment of the machine lowers the do-nothing server too: the anchored ratio
    (case / anchor within each run, then medians) keeps only what the gateway changed."""
    def run(chimera: float, echo: float) -> dict:
        return {"cases": {"echo_c64": {"rows_per_s": echo, "p99_ms": 20},
                          "chimera_c64": {"rows_per_s": chimera, "p99_ms": 60}}}

    runs = {"old": [run(2000, 4000), run(2100, 4200), run(1900, 3800)],
            "new": [run(1600, 3200), run(1700, 3400), run(1800, 3600)]}  # every new run on a slower machine
    row = summarize(runs)["chimera_c64"]
    assert row["rows_per_s_new_over_old"] == 1700 / 2000  # raw medians say 15 % slower
    assert row["anchor"] == "echo_c64" and row["anchored_new_over_old"] == 1.0  # the gateway did not change
    assert row["new"]["over_anchor"] == [0.5, 0.5, 0.5]
    assert "anchored_new_over_old" not in summarize(runs)["echo_c64"]  # references have no anchor


def test_gateway_cases_are_also_judged_on_cpu_per_row() -> None:
    """Rows/s swings with the machine; the gateway's CPU per answered row is the code's own cost. Runs
    without the figure (an old report) are left out rather than counted as zero."""
    def run(cpu: float | None) -> dict:
        case = {"rows_per_s": 2000, "p99_ms": 60}
        if cpu is not None:
            case["gateway_cpu_us_per_row"] = cpu
        return {"cases": {"chimera_c64": case}}

    runs = {"old": [run(400), run(420), run(None)], "new": [run(380), run(390), run(500)]}
    row = summarize(runs)["chimera_c64"]
    assert row["old"]["gateway_cpu_us_per_row"] == [400, 420]
    assert row["old"]["median_gateway_cpu_us_per_row"] == 410
    assert row["new"]["median_gateway_cpu_us_per_row"] == 390
    assert row["cpu_per_row_new_over_old"] == 390 / 410
    assert "0.951" in format_table(summarize(runs))
