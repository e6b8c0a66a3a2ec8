"""bench/report.py: BENCHMARKS.md is generated from a run's results, naming where they came from."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402
import run  # noqa: E402


def side(scale: float, *, shutdown: bool) -> dict[str, Any]:
    """Synthetic figures of one side, every value ``scale`` times a base."""
    def stats(p50: float, p95: float, censored: int = 0) -> dict[str, Any]:
        return {"n": 5, "p50": p50 * scale, "p95": p95 * scale, "max": p95 * scale, "censored": censored,
                "unit": "s", "mean": p50 * scale}

    figures: dict[str, Any] = {
        "warm_start": stats(0.004, 0.006),
        "cold_start": stats(0.4, 0.5),
        "burst": {"start": stats(0.1, 0.2), "all_running": stats(0.25, 0.25), "size": 20, "idle": 2},
        "burst_sized_pool": {"start": stats(0.05, 0.08), "idle": 20},
        "crash_detection": stats(0.01, 0.02),
        "density": {"pss_mib": stats(40.0, 42.0), "rss_mib": stats(90.0, 95.0), "jobs_in_8_gib": int(8192 // (40 * scale))},
        "submissions_per_second": 200.0 / scale,
    }
    if shutdown:
        figures["shutdown"] = {b: stats(1.0, 2.0) for b in ("cooperative", "ignores_cancellation",
                                                            "swallows_cancellation", "blocks_loop", "callback_hangs")}
        figures["status_queries_per_second"] = 300.0
    return figures


def results() -> dict[str, Any]:
    ours, anchor, floor = side(2.0, shutdown=True), side(1.0, shutdown=True), side(1.5, shutdown=False)
    anchor["shutdown"]["swallows_cancellation"] = {"n": 5, "p50": None, "p95": None, "max": None, "censored": 5,
                                                   "unit": "s", "mean": None}
    anchor["status_queries_per_second"] = None
    ours["shutdown"]["cooperative"]["max"] = 2.1
    return {
        "mode": "full", "date": "2030-01-02 03:04:05 UTC", "seconds": 420.0,
        "sizes": {"runs": 30, "bursts": 3, "burst-size": 20, "shutdown-jobs": 20, "density-jobs": 20},
        "machine": {"cpus": 2, "cpu_model": "Example CPU 9000", "memory_gib": 23.5, "python": "3.11.7",
                    "platform": "Linux-6.18-x86_64"},
        "versions": {"python": "3.11.7", "ray": "2.60.0", "rayvisor": "0.1.0", "livekit_agents": "1.8.9"},
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True},
        "rayvisor": {"seconds": 200.0, "figures": ours},
        "livekit_agents": {"seconds": 120.0, "figures": anchor},
        "ray_floor": {"seconds": 100.0, "figures": floor},
        "comparison": run.compare(ours, anchor, floor),
    }


def test_report_names_the_machine_versions_and_commit() -> None:
    page = report.render(results())
    assert "2 cores (Example CPU 9000), 23.5 GiB memory" in page
    assert "Python 3.11.7" in page
    assert "rayvisor 0.1.0 on Ray 2.60.0" in page
    assert "livekit-agents 1.8.9" in page
    assert "`0123456789abcdef0123456789abcdef01234567` (with uncommitted changes in the tree)" in page
    assert "2030-01-02 03:04:05 UTC" in page


def test_every_row_carries_three_values_and_both_ratios() -> None:
    data = results()
    page = report.render(data)
    lines = page.splitlines()
    for row in data["comparison"]:
        cells = [row["figure"],
                 run.fmt(row["rayvisor"], row["unit"], row["rayvisor_censored"]),
                 run.fmt(row["livekit_agents"], row["unit"], row["livekit_agents_censored"]),
                 run.fmt(row["ray_floor"], row["unit"], row["ray_floor_censored"]),
                 run.fmt_ratio(row["ratio"]), run.fmt_ratio(row["ratio_to_floor"])]
        prefix = "| " + " | ".join(cells) + " |"
        assert any(line.startswith(prefix) for line in lines), prefix


def test_rows_read_as_expected() -> None:
    lines = report.render(results()).splitlines()
    assert "| warm start p50 | 8.0 ms | 4.0 ms | 6.0 ms | 2.00 | 1.33 | ≤ 1.5 × LiveKit Agents: **missed** |" in lines
    assert "| idle job PSS (median) | 80.0 MiB | 40.0 MiB | 60.0 MiB | 2.00 | 1.33 | ≤ floor + 10 MiB: **missed** |" in lines
    assert "| jobs in 8 GiB (by PSS) | 102 | 204 | 136 | 0.50 | 0.75 |  |" in lines
    assert "| shutdown, cooperative: max | 2.10 s | 2.00 s | n/a | 1.05 | - | ≤ 2.25 s: met |" in lines
    # a side that never ended is shown as killed at the cap; the floor has no shutdown rows
    assert "| shutdown, swallows_cancellation: max | 4.00 s | > 20 s (killed) | n/a | - | - | ≤ 2.25 s: **missed** |" in lines
    assert "| status queries/s while jobs run | 300.0 /s | n/a | n/a | - | - |  |" in lines


def test_a_clean_tree_and_an_unknown_commit_are_said_so() -> None:
    data = results()
    data["git"] = {"commit": "fedcba9876543210fedcba9876543210fedcba98", "dirty": False}
    assert "`fedcba9876543210fedcba9876543210fedcba98` (clean tree)" in report.render(data)
    data["git"] = {"commit": None, "dirty": None}
    assert "unknown (not run from a git checkout)" in report.render(data)


def test_each_missed_target_says_what_bounds_it_and_a_met_one_does_not() -> None:
    data = results()
    ours, anchor, floor = data["rayvisor"]["figures"], data["livekit_agents"]["figures"], data["ray_floor"]["figures"]
    ours["cold_start"] = floor["cold_start"]  # met: 1.0 x the floor
    data["comparison"] = run.compare(ours, anchor, floor)
    page = report.render(data)
    section = page.split("## Missed targets: what bounds them", 1)[1].split("\n## ", 1)[0]
    bounded = [line.split(":**", 1)[0].removeprefix("- **") for line in section.splitlines() if line.startswith("- **")]
    # cold start (1.0 x floor) and the sized burst (1.33 x floor) meet theirs
    assert bounded == ["warm start p50", "crash detection p50", "idle job PSS (median)",
                       "submissions/s to running (20 idle)"]
    assert "takes 6.0 ms here, 1.50 × LiveKit Agents" in section  # the run's floor, not a fixed number


def test_a_run_that_meets_every_target_has_no_bounds_section() -> None:
    data = results()
    anchor = data["livekit_agents"]["figures"]
    data["comparison"] = run.compare(anchor, anchor, anchor)
    assert "what bounds them" not in report.render(data)
