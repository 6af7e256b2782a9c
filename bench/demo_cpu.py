"""The CPU `treasure-engine demo` takes, at its default rate and at a higher one (issue 15; not part of `make bench`).

    .venv/bin/python bench/demo_cpu.py [--rates 4000 40000] [--duration 30] [--kinesalite] [--json]

Runs ``treasure-engine demo --json --port 0 --rate R --duration D`` once per rate, one after the other, each in
its own process, and reads that process's resource usage when it ends (``os.wait4``: user + sys CPU seconds,
peak RSS), its wall time, and its books (the demo's JSON summary: produced, lost, ...; it exits 1 when an event
was lost). The same figures by hand::

    /usr/bin/time -v .venv/bin/treasure-engine demo --json --port 0 --rate 40000

The demo serves Kinesis and DynamoDB from moto inside its own process, so its CPU includes the emulator's.
``--kinesalite`` points it at a kinesalite started here instead (``--endpoint-url``; DynamoDB stays embedded),
which leaves Kinesis's side out of the demo's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.emulators import FAKE_AWS_ENV, UNSET_AWS_ENV, Kinesalite  # noqa: E402

DEMO = Path(sys.executable).with_name("treasure-engine")


def run_demo(rate: int, duration: float, endpoint_url: str | None) -> dict[str, Any]:
    cmd = [str(DEMO), "demo", "--json", "--port", "0", "--rate", str(rate), "--duration", str(duration)]
    if endpoint_url:
        cmd += ["--endpoint-url", endpoint_url]
    env = {k: v for k, v in os.environ.items() if k not in UNSET_AWS_ENV}
    env.update(FAKE_AWS_ENV)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        pid = os.posix_spawn(cmd[0], cmd, env, file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                                                             (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])  # fmt: skip
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    code = os.waitstatus_to_exitcode(status)
    try:
        books: dict[str, Any] = json.loads(stdout[stdout.index("{") :])
    except ValueError:
        books = {}
    cpu = usage.ru_utime + usage.ru_stime
    produced = books.get("produced", 0)
    return {
        "command": " ".join(cmd),
        "rate": rate,
        "exit_code": code,
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "cpu_s": cpu,
        "cores_busy": cpu / wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "produced": produced,
        "cpu_per_event_us": cpu / produced * 1e6 if produced else None,
        "lost": books.get("lost"),
        "balanced": code == 0 and books.get("lost") == 0,
        "books": {k: v for k, v in books.items() if k not in ("alert_events", "state_dir", "monitor", "stream")},
        "stderr_tail": stderr[-2000:] if code != 0 or not books else "",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=int, nargs="+", default=[4_000, 40_000], help="peak events/s (demo default 4,000)")
    ap.add_argument("--duration", type=float, default=30.0, help="the demo's --duration (its default: 30)")
    ap.add_argument("--kinesalite", action="store_true", help="Kinesis from a kinesalite here, not in the demo")
    ap.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = ap.parse_args()

    kinesis = Kinesalite() if args.kinesalite else None
    try:
        endpoint = kinesis.endpoint_url if kinesis else None
        results = [run_demo(rate, args.duration, endpoint) for rate in args.rates]
    finally:
        if kinesis is not None:
            kinesis.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("| rate (peak events/s) | wall | CPU (user + sys) | cores busy | produced | CPU per event | lost | books "
              "balanced | peak RSS |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in results:
            per = f"{r['cpu_per_event_us']:,.1f} µs" if r["cpu_per_event_us"] is not None else "-"
            print(
                f"| {r['rate']:,} | {r['wall_s']:,.1f} s | {r['cpu_s']:,.1f} s ({r['user_s']:,.1f} + {r['sys_s']:,.1f})"
                f" | {r['cores_busy']:.2f} | {r['produced']:,} | {per} | {r['lost']} "
                f"| {'yes' if r['balanced'] else 'NO'} | {r['peak_rss_mib']:,.0f} MiB |"
            )
        for r in results:
            if r["stderr_tail"]:
                print(f"\nrate {r['rate']}: exit {r['exit_code']}\n{r['stderr_tail']}", file=sys.stderr)
    return 0 if all(r["balanced"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
