"""rayvisor vs LiveKit Agents vs bare Ray, side by side in one run: ``python bench/run.py [--quick]``.

Sets up LiveKit Agents in its own virtual environment (it pins an older ``livekit``),
then runs its side, rayvisor's and the Ray floor's (bare Ray actors doing the same work),
on this machine, one after the other (never at once: two systems on 2 cores would measure
each other). Prints a table of medians, p95s and ratios (rayvisor / LiveKit Agents and
rayvisor / floor). A full run writes ``bench/results/full.json``, the artifact that
``bench/report.py`` turns into BENCHMARKS.md; ``--quick`` writes ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ANCHOR_VENV = HERE / ".venv-anchor"
ANCHOR_REQUIREMENT = "livekit-agents==1.8.9"
RESULTS_FULL = HERE / "results" / "full.json"
"""A full run's results: committed, the source of BENCHMARKS.md (``bench/report.py``)."""
RESULTS_QUICK = HERE / "results.json"
"""A quick run's results (CI's smoke run): git-ignored."""
SIZES = {
    "full": {"runs": 30, "bursts": 3, "burst-size": 20, "shutdown-jobs": 20, "density-jobs": 20},
    "quick": {"runs": 5, "bursts": 1, "burst-size": 20, "shutdown-jobs": 3, "density-jobs": 5},
}
RAYVISOR_ONLY = {"full": {"control-jobs": 100, "query-seconds": 3.0}, "quick": {"control-jobs": 20, "query-seconds": 1.0}}


def anchor_python() -> Path:
    """The LiveKit Agents venv's interpreter, created and installed on first use."""
    python = ANCHOR_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import livekit.agents, psutil"],
                                          capture_output=True).returncode == 0:
        return python
    print(f"setting up {ANCHOR_REQUIREMENT} in {ANCHOR_VENV} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", ANCHOR_VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", ANCHOR_REQUIREMENT, "psutil"], check=True)
    return python


def run_side(python: Path | str, script: str, sizes: dict[str, Any], marks: Path) -> dict[str, Any]:
    out = marks.with_suffix(".json")
    args = [str(python), str(HERE / script), "--out", str(out)]
    for key, value in sizes.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "RAYVISOR_BENCH_MARKS": str(marks)}
    began = time.monotonic()
    log = marks.with_suffix(".log")
    print(f"running {script} ...", file=sys.stderr, flush=True)
    with log.open("w") as sink:  # the sides log every deliberate kill and crash: keep it off the table
        finished = subprocess.run(args, env=env, cwd=HERE, stdout=sink, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{script} failed (exit {finished.returncode})")
    result = json.loads(out.read_text())
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def git_state() -> dict[str, Any]:
    """The commit the run was made at, and whether the work tree differed from it."""
    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(git("status", "--porcelain").stdout.strip())}


# --------------------------------------------------------------------------- the table

SIDES = (("rayvisor", "rayvisor"), ("livekit_agents", "LiveKit Agents"), ("ray_floor", "Ray floor"))
"""(key in results.json and each comparison row, column heading)."""


def rows() -> list[tuple[str, list[str], str, str]]:
    """(label, path, unit, better): every figure of the table."""
    table = [
        ("warm start p50", ["warm_start", "p50"], "ms", "lower"),
        ("warm start p95", ["warm_start", "p95"], "ms", "lower"),
        ("cold start p50", ["cold_start", "p50"], "ms", "lower"),
        ("cold start p95", ["cold_start", "p95"], "ms", "lower"),
        ("burst of 20, min(cores, 4) idle: start p50", ["burst", "start", "p50"], "ms", "lower"),
        ("burst of 20, min(cores, 4) idle: start p95", ["burst", "start", "p95"], "ms", "lower"),
        ("burst of 20, min(cores, 4) idle: all running (p50)", ["burst", "all_running", "p50"], "ms", "lower"),
        ("burst of 20, 20 idle: start p50", ["burst_sized_pool", "start", "p50"], "ms", "lower"),
        ("burst of 20, 20 idle: start p95", ["burst_sized_pool", "start", "p95"], "ms", "lower"),
        ("crash detection p50", ["crash_detection", "p50"], "ms", "lower"),
        ("crash detection p95", ["crash_detection", "p95"], "ms", "lower"),
        ("idle job PSS (median)", ["density", "pss_mib", "p50"], "MiB", "lower"),
        ("idle job RSS (median)", ["density", "rss_mib", "p50"], "MiB", "lower"),
        ("jobs in 8 GiB (by PSS)", ["density", "jobs_in_8_gib"], "jobs", "higher"),
        ("submissions/s to running (20 idle)", ["submissions_per_second"], "/s", "higher"),
        ("status queries/s while jobs run", ["status_queries_per_second"], "/s", "higher"),
    ]
    for behaviour in ("cooperative", "ignores_cancellation", "swallows_cancellation", "blocks_loop", "callback_hangs"):
        table.append((f"shutdown, {behaviour}: p50", ["shutdown", behaviour, "p50"], "s", "lower"))
        table.append((f"shutdown, {behaviour}: max", ["shutdown", behaviour, "max"], "s", "lower"))
    return table


def lookup(figures: dict[str, Any], path: list[str]) -> Any:
    value: Any = figures
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def fmt(value: Any, unit: str, censored: bool) -> str:
    """A row's value in its unit; None is "n/a" (not measured) or the cap (never ended)."""
    if value is None:
        return "> 20 s (killed)" if censored else "n/a"
    if unit == "ms":
        return f"{value * 1000:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit in ("/s", "MiB"):
        return f"{value:.1f} {unit}"
    return f"{value}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" if ratio < 10 else f"{ratio:.1f}"


def ratio_of(ours: Any, theirs: Any) -> float | None:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs:
        return ours / theirs
    return None


def compare(rayvisor: dict[str, Any], anchor: dict[str, Any], floor: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: each side's value (None if it has none), whether it was censored
    at the cap, and the ratios rayvisor / LiveKit Agents and rayvisor / floor."""
    compared = []
    for label, path, unit, better in rows():
        row: dict[str, Any] = {"figure": label, "unit": unit, "better": better}
        for key, figures in (("rayvisor", rayvisor), ("livekit_agents", anchor), ("ray_floor", floor)):
            parent = lookup(figures, path[:-1]) if path[-1] in ("p50", "p95", "max") else None
            row[key] = lookup(figures, path)
            row[f"{key}_censored"] = bool(parent and parent.get("censored"))
        row["ratio"] = ratio_of(row["rayvisor"], row["livekit_agents"])
        row["ratio_to_floor"] = ratio_of(row["rayvisor"], row["ray_floor"])
        compared.append(row)
    return compared


def print_table(compared: list[dict[str, Any]]) -> None:
    header = (f"{'figure':<52} {'rayvisor':>16} {'LiveKit Agents':>16} {'Ray floor':>12} "
              f"{'rv/LKA':>7} {'rv/floor':>8}  better")
    print(header)
    print("-" * len(header))
    for row in compared:
        values = [fmt(row[key], row["unit"], row[f"{key}_censored"]) for key, _ in SIDES]
        print(f"{row['figure']:<52} {values[0]:>16} {values[1]:>16} {values[2]:>12} "
              f"{fmt_ratio(row['ratio']):>7} {fmt_ratio(row['ratio_to_floor']):>8}  {row['better']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under 5 minutes (fewer runs)")
    parser.add_argument("--out", help="where the results go (default: bench/results/full.json for a full run, "
                                      "bench/results.json for --quick)")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    out = Path(args.out) if args.out else (RESULTS_QUICK if args.quick else RESULTS_FULL)
    git = git_state()  # before the run: the code that is measured
    python = anchor_python()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rayvisor-bench-") as tmp:
        anchor = run_side(python, "anchor_side.py", SIZES[mode], Path(tmp) / "anchor-marks")
        ours = run_side(sys.executable, "rayvisor_side.py", {**SIZES[mode], **RAYVISOR_ONLY[mode]},
                        Path(tmp) / "rayvisor-marks")
        floor = run_side(sys.executable, "ray_floor_side.py", SIZES[mode], Path(tmp) / "floor-marks")
    compared = compare(ours["figures"], anchor["figures"], floor["figures"])
    print_table(compared)
    versions = {"python": platform.python_version(), **floor["versions"], **ours["versions"], **anchor["versions"]}
    results = {"mode": mode, "sizes": SIZES[mode], "machine": machine(), "versions": versions, "git": git,
               "seconds": round(time.monotonic() - began, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "rayvisor": ours, "livekit_agents": anchor, "ray_floor": floor, "comparison": compared}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{mode} run in {results['seconds']} s; results in {out}")
    if mode == "full" and out == RESULTS_FULL:
        print("regenerate BENCHMARKS.md from them with: python bench/report.py")


if __name__ == "__main__":
    main()
