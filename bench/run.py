"""rayvisor vs LiveKit Agents, side by side in one run: ``python bench/run.py [--quick]``.

Sets up LiveKit Agents in its own virtual environment (it pins an older ``livekit``),
runs its side, then rayvisor's, on this machine, one after the other (never at once: two
systems on 2 cores would measure each other). Prints a table of medians, p95s and
ratios (rayvisor / LiveKit Agents) and writes ``bench/results.json``.
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
    with log.open("w") as sink:  # both systems log every deliberate kill and crash: keep it off the table
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


# --------------------------------------------------------------------------- the table

Row = tuple[str, str, str, float | None]
"""(figure, path into the figures, better-when, target ratio or None)."""


def rows() -> list[tuple[str, list[str], str, str]]:
    """(label, path, unit, better): every figure of the table."""
    table = [
        ("warm start p50", ["warm_start", "p50"], "ms", "lower"),
        ("warm start p95", ["warm_start", "p95"], "ms", "lower"),
        ("cold start p50", ["cold_start", "p50"], "ms", "lower"),
        ("cold start p95", ["cold_start", "p95"], "ms", "lower"),
        ("burst of 20: start p50", ["burst", "start", "p50"], "ms", "lower"),
        ("burst of 20: start p95", ["burst", "start", "p95"], "ms", "lower"),
        ("burst of 20: all running (p50)", ["burst", "all_running", "p50"], "ms", "lower"),
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
    if value is None:
        return "> 20 s (killed)" if censored else "n/a"
    if unit == "ms":
        return f"{value * 1000:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit in ("/s", "MiB"):
        return f"{value:.1f} {unit}"
    return f"{value}"


def compare(rayvisor: dict[str, Any], anchor: dict[str, Any]) -> list[dict[str, Any]]:
    compared = []
    for label, path, unit, better in rows():
        ours, theirs = lookup(rayvisor, path), lookup(anchor, path)
        parent = lookup(anchor, path[:-1]) if path[-1] in ("p50", "p95", "max") else None
        their_censored = bool(parent and parent.get("censored"))
        our_parent = lookup(rayvisor, path[:-1]) if path[-1] in ("p50", "p95", "max") else None
        our_censored = bool(our_parent and our_parent.get("censored"))
        ratio = ours / theirs if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and theirs else None
        compared.append({"figure": label, "unit": unit, "better": better, "rayvisor": ours, "livekit_agents": theirs,
                         "ratio": ratio, "rayvisor_censored": our_censored, "livekit_agents_censored": their_censored})
    return compared


def print_table(compared: list[dict[str, Any]]) -> None:
    header = f"{'figure':<44} {'rayvisor':>16} {'LiveKit Agents':>18} {'ratio':>8}  better"
    print(header)
    print("-" * len(header))
    for row in compared:
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(f"{row['figure']:<44} {fmt(row['rayvisor'], row['unit'], row['rayvisor_censored']):>16} "
              f"{fmt(row['livekit_agents'], row['unit'], row['livekit_agents_censored']):>18} {ratio:>8}  {row['better']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under 3 minutes (fewer runs)")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    python = anchor_python()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rayvisor-bench-") as tmp:
        anchor = run_side(python, "anchor_side.py", SIZES[mode], Path(tmp) / "anchor-marks")
        ours = run_side(sys.executable, "rayvisor_side.py", {**SIZES[mode], **RAYVISOR_ONLY[mode]},
                        Path(tmp) / "rayvisor-marks")
    compared = compare(ours["figures"], anchor["figures"])
    print_table(compared)
    results = {"mode": mode, "sizes": SIZES[mode], "machine": machine(), "seconds": round(time.monotonic() - began, 1),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rayvisor": ours, "livekit_agents": anchor,
               "comparison": compared}
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{mode} run in {results['seconds']} s; results in {args.out}")


if __name__ == "__main__":
    main()
