"""Soak test of the running service: steady ingest, scrapes and polling for many minutes.

It starts `cco-exporter serve` in a subprocess with a fresh SQLite file and an empty config dir
(so maintenance runs with its defaults: the first pass shortly after start), then for
`--minutes` (20; `--quick` = 2):

- `cco-exporter simulate --rate 2000` posts batched synthetic events (a child process);
- a scraper thread GETs `/metrics`, `/api/metrics/stats` and `/api/metrics/current` once a
  second each, as Prometheus and a TUI would, counting failures and timing each;
- every `--sample` seconds (10) the main thread records the server's RSS and open file
  descriptors (psutil), the write-queue depth and events written (health), the database and WAL
  sizes, and the p50/p99 of `--probes` (20) single-event POSTs it sends itself, one at a time.

At the end it stops the load, waits for the queue to drain, stops the server with SIGTERM and
checks that every accepted event is a row. It prints a table of the samples and a verdict, and
writes bench/results/soak.json. The verdict is about flatness: least-squares slopes over the
second half of the run of RSS (MB/min) and of open descriptors (per min), and the p99 of the
probes in the second half against the first. RSS grows by design while the 10-minute window
fills, so the slopes start at 10 minutes at the earliest, and a run too short to have 3 minutes
after that (`--quick`) is a smoke run: its slopes are printed, not judged.

Not part of `make test`: it takes `--minutes` + about a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_http import LOG_PROBLEM, Server, tree_rss  # noqa: E402  (the script's own folder)

from exporter.simulate import synthetic_events  # noqa: E402  (needs the repo on sys.path)

RESULTS_PATH = REPO / "bench" / "results" / "soak.json"
DRAIN_TIMEOUT_S = 120.0
#: Flat means RSS grows less than this over the second half, in MB per minute (20 min at this
#: slope would be 10 MB: within the noise of the allocator, far from a leak per event).
RSS_SLOPE_LIMIT_MB_MIN = 0.5
#: Flat means open descriptors grow less than this per minute over the second half.
FDS_SLOPE_LIMIT_MIN = 0.2
#: The 10-minute window (a ring of 1-second buckets per label set) fills this long: until then
#: RSS grows with it, whatever the leaks.
WINDOW_FILL_S = 600.0
#: Slopes over less time than this after the window filled are not judged.
MIN_JUDGED_S = 180.0
SCRAPED = ("/metrics", "/api/metrics/stats", "/api/metrics/current")


@dataclass
class Sample:
    """One row of the table: the server's state `t_s` seconds into the load."""

    t_s: float
    rss_mb: float
    fds: int
    queue_depth: int
    events_written: int
    db_mb: float
    wal_mb: float
    post_p50_ms: float
    post_p99_ms: float
    scrape_p99_ms: float
    scrape_errors: int


@dataclass
class Scrapes:
    """What the scraper thread saw since the last sample (latencies are drained each sample)."""

    latencies_ms: list[float] = field(default_factory=list)
    #: Every latency of the run by path, for the per-endpoint p99 of the summary.
    by_path: dict[str, list[float]] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> list[float]:
        with self.lock:
            taken, self.latencies_ms = self.latencies_ms, []
        return taken


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60


def scrape_loop(url: str, stop: threading.Event, scrapes: Scrapes) -> None:
    """GET each scraped path once a second, like Prometheus and a TUI side by side."""
    with httpx.Client(base_url=url, timeout=5) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            for path in SCRAPED:
                started = time.perf_counter()
                try:
                    ok = client.get(path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = (time.perf_counter() - started) * 1000
                with scrapes.lock:
                    scrapes.requests += 1
                    scrapes.latencies_ms.append(elapsed)
                    scrapes.by_path.setdefault(path, []).append(elapsed)
                    scrapes.errors += 0 if ok else 1
            next_at += 1.0
            stop.wait(max(0.0, next_at - time.monotonic()))


def probe_posts(client: httpx.Client, rng: random.Random, count: int) -> list[float]:
    """Latencies (ms) of `count` single-event POSTs, one after another; failures raise."""
    latencies: list[float] = []
    for _ in range(count):
        body = msgspec.json.encode(synthetic_events(rng, time.time_ns() // 1_000_000, 1)[0])
        started = time.perf_counter()
        response = client.post(
            "/api/events", content=body, headers={"content-type": "application/json"}
        )
        latencies.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return latencies


def take_sample(
    server: Server, client: httpx.Client, rng: random.Random, args: argparse.Namespace, t: float
) -> tuple[Sample, list[float]]:
    process = psutil.Process(server.pid)
    latencies = probe_posts(client, rng, args.probes)
    health = client.get("/api/metrics/health").json()
    wal = Path(str(server.db) + "-wal")
    return (
        Sample(
            t_s=round(t, 1),
            rss_mb=round(tree_rss(process) / 1e6, 2),
            fds=process.num_fds(),
            queue_depth=int(health["queue_depth"]),
            events_written=int(health["events_written"]),
            db_mb=round(server.db.stat().st_size / 1e6, 2),
            wal_mb=round(wal.stat().st_size / 1e6, 2) if wal.exists() else 0.0,
            post_p50_ms=round(percentile(latencies, 0.5), 2),
            post_p99_ms=round(percentile(latencies, 0.99), 2),
            scrape_p99_ms=0.0,
            scrape_errors=0,
        ),
        latencies,
    )


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    duration_s = args.minutes * 60
    # The soak runs the server as shipped: defaults (heartbeat, maintenance on), OTLP off.
    server = Server(tmp, "soak", heartbeat=True).start()
    stop = threading.Event()
    scrapes = Scrapes()
    scraper = threading.Thread(target=scrape_loop, args=(server.url, stop, scrapes), daemon=True)
    load_out = tmp / "simulate.out"
    rng = random.Random(7)
    samples: list[Sample] = []
    probes: list[tuple[float, float]] = []
    with load_out.open("wb") as out:
        load = subprocess.Popen(
            [
                *(sys.executable, "-m", "exporter", "simulate", "--rate", str(args.rate)),
                *("--duration", str(duration_s), "--seed", "1", "--url", server.url),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server.env,
            cwd=REPO,
        )
    started = time.monotonic()
    scraper.start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            next_at = started + args.sample
            while time.monotonic() - started < duration_s:
                time.sleep(max(0.0, next_at - time.monotonic()))
                next_at += args.sample
                t = time.monotonic() - started
                sample, latencies = take_sample(server, client, rng, args, t)
                scraped = scrapes.take()
                sample.scrape_p99_ms = round(percentile(scraped, 0.99), 2)
                sample.scrape_errors = scrapes.errors
                samples.append(sample)
                probes += [(t, latency) for latency in latencies]
                print(row(sample), flush=True)
                if load.poll() is not None and time.monotonic() - started < duration_s - 5:
                    raise RuntimeError(f"the load stopped early:\n{load_out.read_text()}")
            load.wait(60)
            drained = wait_drained(client)
    finally:
        stop.set()
        scraper.join(10)
        if load.poll() is None:
            load.kill()
            load.wait(10)
        exit_code = server.stop()
    simulate_summary = load_out.read_text().strip().splitlines()
    return {
        "samples": [asdict(s) for s in samples],
        "probe_latencies": probes,
        "drained_health": drained,
        "rows_after_stop": server.query("SELECT count(*) FROM api_calls")
        + server.query("SELECT count(*) FROM activity_events"),
        "scrape_requests": scrapes.requests,
        "scrape_errors": scrapes.errors,
        "scrape_p99_ms_by_path": {
            path: round(percentile(values, 0.99), 2) for path, values in scrapes.by_path.items()
        },
        "simulate": simulate_summary[-1] if simulate_summary else "",
        "server_exit_code": exit_code,
        "server_log_problems": [
            line for line in server.logs().splitlines() if LOG_PROBLEM.search(line)
        ],
    }


def wait_drained(client: httpx.Client) -> dict[str, Any]:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while True:
        health: dict[str, Any] = client.get("/api/metrics/health").json()
        if health["queue_depth"] == 0:
            return health
        if time.monotonic() > deadline:
            raise RuntimeError(f"not drained within {DRAIN_TIMEOUT_S}s: {health}")
        time.sleep(0.2)


HEADER = (
    f"{'t (s)':>7} {'RSS MB':>8} {'fds':>5} {'queue':>6} {'written':>10} {'db MB':>7}"
    f" {'wal MB':>7} {'POST p50':>9} {'POST p99':>9} {'scrape p99':>11} {'errors':>6}"
)


def row(s: Sample) -> str:
    return (
        f"{s.t_s:>7.0f} {s.rss_mb:>8.1f} {s.fds:>5} {s.queue_depth:>6} {s.events_written:>10}"
        f" {s.db_mb:>7.1f} {s.wal_mb:>7.1f} {s.post_p50_ms:>9.2f} {s.post_p99_ms:>9.2f}"
        f" {s.scrape_p99_ms:>11.2f} {s.scrape_errors:>6}"
    )


def verdict(results: dict[str, Any], duration_s: float) -> dict[str, Any]:
    samples = results["samples"]
    half = duration_s / 2
    judged_from = max(half, WINDOW_FILL_S)
    judged = duration_s - judged_from >= MIN_JUDGED_S
    second = [s for s in samples if s["t_s"] >= judged_from]
    rss_slope = slope_per_min([(s["t_s"], s["rss_mb"]) for s in second])
    fds_slope = slope_per_min([(s["t_s"], float(s["fds"])) for s in second])
    first_probes = [lat for t, lat in results["probe_latencies"] if t < half]
    second_probes = [lat for t, lat in results["probe_latencies"] if t >= half]
    written = results["drained_health"]["events_written"]
    checks = {
        # None: not judged (a smoke run), which does not fail the verdict.
        "rss_flat": abs(rss_slope) < RSS_SLOPE_LIMIT_MB_MIN if judged else None,
        "fds_flat": abs(fds_slope) < FDS_SLOPE_LIMIT_MIN if judged else None,
        "no_scrape_errors": results["scrape_errors"] == 0,
        "every_event_stored": results["rows_after_stop"] >= written,
        "clean_exit": results["server_exit_code"] == 0,
    }
    return {
        "rss_mb_first": samples[0]["rss_mb"] if samples else None,
        "rss_mb_max": max((s["rss_mb"] for s in samples), default=None),
        "rss_mb_last": samples[-1]["rss_mb"] if samples else None,
        "slopes_from_s": judged_from,
        "rss_slope_mb_per_min_second_half": round(rss_slope, 3),
        "fds_min_max": [min(s["fds"] for s in samples), max(s["fds"] for s in samples)]
        if samples
        else None,
        "fds_slope_per_min_second_half": round(fds_slope, 3),
        "post_p99_ms_first_half": round(percentile(first_probes, 0.99), 2),
        "post_p99_ms_second_half": round(percentile(second_probes, 0.99), 2),
        "queue_depth_max": max((s["queue_depth"] for s in samples), default=None),
        "events_written": written,
        "events_per_s": round(written / duration_s, 1),
        "checks": checks,
        "flat": all(ok is not False for ok in checks.values()),
        "judged": judged,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the load (20)")
    parser.add_argument("--quick", action="store_true", help="2 minutes, for a smoke run")
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second (2000)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--probes", type=int, default=20, help="single POSTs timed per sample")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    parser.add_argument("--tmpdir", help="where the database goes (default: the system's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 2.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        # Other processes on the machine skew every figure; the load says how busy it was.
        "load_avg_at_start": os.getloadavg(),
    }
    print(
        f"cco-exporter soak: {args.minutes:g} min at {args.rate:g} events/s,"
        f" {machine['cpu_count']} CPUs, Python {machine['python']}\n{HEADER}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="cco-soak-", dir=args.tmpdir) as tmp:
        results = run(args, Path(tmp))
    machine["load_avg_at_end"] = os.getloadavg()
    summary = verdict(results, args.minutes * 60)
    print(f"\nsimulate: {results['simulate']}")
    print(
        f"scrapes: {results['scrape_requests']} requests, {results['scrape_errors']} failed,"
        f" p99 ms by path {results['scrape_p99_ms_by_path']}"
    )
    for key, value in summary.items():
        print(f"{key}: {value}")
    if results["server_log_problems"]:
        print(f"\nserver log: {len(results['server_log_problems'])} warning/error lines:")
        for line in results["server_log_problems"][:10]:
            print(f"  {line}")
    if not summary["judged"]:
        verdict_text = "SMOKE RUN (too short to judge flatness; checks passed)"
        if not summary["flat"]:
            verdict_text = "SMOKE RUN FAILED"
    else:
        verdict_text = "FLAT" if summary["flat"] else "NOT FLAT"
    print(f"\nverdict: {verdict_text}")
    report = {
        "bench": "soak",
        "quick": args.quick,
        "machine": machine,
        "params": {k: v for k, v in vars(args).items() if k not in ("output", "tmpdir")},
        "summary": summary,
        "results": {k: v for k, v in results.items() if k != "probe_latencies"},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.output}")
    return 0 if summary["flat"] else 1


if __name__ == "__main__":
    sys.exit(main())
