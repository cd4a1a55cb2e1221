"""HTTP benchmark of the running service against SPEC §9's targets, on this machine.

Every measure runs against `cco-exporter serve` in a subprocess with a fresh SQLite file, an
empty config dir and OTLP pushed every second to a local receiver (tests/otlp_receiver.py) in a
child process of its own. It measures:

1. single-event POST, events/s: wrk posting one event per request (-t1 -c16), best of
   `--repeats` rounds after a warm-up; wrk's latency p50/p99 and non-2xx answers; then the events
   the server counted (`cco_exporter_events_ingested_total`, the sum of
   `cco_llm_requests_total`) against wrk's completed requests, the rows in SQLite and the last
   OTLP export;
2. batched ingest end to end, events/s: wrk posting JSON arrays of 1000 events over 50 label
   sets (-t2 -c4), then health polled until the write queue is empty; committed events/s =
   events written / time from the start of the load until drained. Rows in SQLite and the last
   OTLP export must equal the events accepted. Best of `--repeats` rounds, a fresh server each;
3. read latency: sequential keep-alive GETs (httpx) of `/api/metrics/stats` (1 s response
   cache), `/api/metrics/recent?limit=20` and `/metrics` (both uncached), one every 10 ms in
   turn, ~500 of each: idle, under batched load paced at `--load-rate` events/s (wrk's
   `delay()`, calibrated by the time one batch takes; the achieved rate is reported), and
   under unpaced batched load;
4. RSS of the server while `cco-exporter simulate --rate 10000` runs for 60 s, sampled every
   5 s with psutil (start, max, final, and the kernel's high-water mark); the achieved rate and
   the label sets stored.

`--profile` adds a py-spy record (`--gil`) of the server under the loads of (1) and (2) and
prints the frames with the most own and inclusive samples. `--only` runs some measures only.

wrk (Debian package `wrk`) generates the load, because a Python client would be the bottleneck.
Without wrk the script says so and falls back to an httpx client in a child process, whose
figures are then a floor rather than the server's.

It prints a table (value, target, pass/fail) and writes bench/results/bench_http.json with the
machine's core count and load average. `--quick` is a ~1 minute smoke run; the defaults take
about 5 minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil

REPO = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO / "bench" / "results" / "bench_http.json"
BATCH = 1000

TARGET_SINGLE_PER_S = 8_000
TARGET_BATCHED_PER_S = 200_000
TARGET_STATS_P99_MS = 5.0
TARGET_RSS_MB = 80.0
#: The RSS measure counts only if the simulation got this close to the asked rate.
RATE_TOLERANCE = 0.95

START_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 120.0
#: OTLP pushes every second; the export after the drain must arrive within this.
OTLP_WAIT_S = 8.0

# 5 models x 10 projects, the agent following the project: 50 label sets.
MODELS = ("claude-sonnet-4-5", "claude-opus-4-5", "claude-haiku-4-5", "gpt-4o", "gpt-4o-mini")
PROJECTS = tuple(f"project-{i:02d}" for i in range(10))
AGENTS = ("main", "planner", "code-reviewer", "test-runner", "explorer")
STEPS = ("single", "batched", "reads", "rss")
READ_PATHS = ("/api/metrics/stats", "/api/metrics/recent?limit=20", "/metrics")

# --- load: events, wrk and its fallback -----------------------------------------------------


def make_events(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """`count` api_call events over the 50 label sets, with heavy-tailed token counts.

    No request id, because wrk replays the same bodies and repeated ids would be counted once;
    no timestamp, so the server stamps each event as it arrives.
    """
    events = []
    for _ in range(count):
        model = rng.choice(MODELS)
        project = rng.randrange(len(PROJECTS))
        event: dict[str, Any] = {
            "type": "api_call",
            "model": model,
            "project": PROJECTS[project],
            "agent": AGENTS[project % len(AGENTS)],
            "input_tokens": heavy_tailed(rng, 2_000, 180_000),
            "output_tokens": heavy_tailed(rng, 350, 32_000),
            "latency_ms": round(rng.lognormvariate(math.log(1_500), 0.6), 1),
        }
        if model.startswith("claude") and rng.random() < 0.75:
            event["cache_read_tokens"] = heavy_tailed(rng, 25_000, 190_000)
        if rng.random() < 0.02:
            event.update(status="error", error_type=rng.choice(("rate_limit", "overloaded")))
        events.append(event)
    return events


def heavy_tailed(rng: random.Random, median: float, cap: int) -> int:
    return max(1, min(cap, int(rng.lognormvariate(math.log(median), 1.0))))


def write_bodies(path: Path, bodies: list[bytes]) -> Path:
    """One request body a line (compact JSON has no newline), as the wrk script reads them."""
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path


#: POSTs the lines of a file in turn; `delay` (ms after each response) only when asked, since
#: wrk takes a slower path whenever the script defines it. `done` prints one JSON line.
WRK_SCRIPT = """\
local prepared = {}
local index = 0

function init(args)
  local headers = { ["Content-Type"] = "application/json" }
  for line in io.lines(args[1]) do
    prepared[#prepared + 1] = wrk.format("POST", nil, headers, line)
  end
  local pause = tonumber(args[2]) or 0
  if pause > 0 then
    delay = function() return pause end
  end
end

function request()
  index = index % #prepared + 1
  return prepared[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"timeout": %d, "non_2xx": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
    .. '"max_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


class Load:
    """One run of the load generator against POST /api/events in a child process: wrk, or the
    httpx fallback. `duration_s` bounds it; `finish(interrupt=True)` ends it early."""

    def __init__(
        self,
        url: str,
        bodies: Path,
        *,
        client: str,
        connections: int,
        threads: int,
        duration_s: float,
        pause_ms: int = 0,
    ) -> None:
        self.url = url + "/api/events"
        self.bodies = bodies
        self.client = client
        self.connections = connections
        self.threads = min(threads, connections)
        self.duration_s = duration_s
        self.pause_ms = pause_ms
        self.process: subprocess.Popen[str] | None = None
        self.worker: multiprocessing.Process | None = None
        self.stopping: Any = None
        self.results: Any = None

    def start(self) -> Load:
        if self.client == "wrk":
            script = self.bodies.with_suffix(".lua")
            script.write_text(WRK_SCRIPT)
            command = ["wrk", f"-t{self.threads}", f"-c{self.connections}"]
            command += [f"-d{max(1, round(self.duration_s))}s", "--latency", "--timeout", "10s"]
            command += ["-s", str(script), self.url, "--", str(self.bodies), str(self.pause_ms)]
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        else:
            context = multiprocessing.get_context("spawn")
            self.stopping = context.Event()
            self.results = context.Queue()
            self.worker = context.Process(
                target=httpx_load,
                args=(self.url, str(self.bodies), self.connections, self.duration_s),
                kwargs={
                    "pause_ms": self.pause_ms,
                    "stopping": self.stopping,
                    "results": self.results,
                },
                daemon=True,
            )
            self.worker.start()
        return self

    def finish(self, *, interrupt: bool = False) -> dict[str, Any]:
        """Wait for the run to end (SIGINT first when `interrupt`) and return its figures."""
        timeout = self.duration_s + 60
        if self.process is not None:
            if interrupt and self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
            output, _ = self.process.communicate(timeout=timeout)
            return parse_wrk(output)
        assert self.worker is not None
        if interrupt:
            self.stopping.set()
        result: dict[str, Any] = self.results.get(timeout=timeout)
        self.worker.join(10)
        return result

    def stop(self) -> None:
        """Kill whatever still runs (the finally path)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.worker is not None and self.worker.is_alive():
            self.worker.kill()
            self.worker.join(10)


def parse_wrk(output: str) -> dict[str, Any]:
    for line in output.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON ") :])
            duration_s = raw["duration_us"] / 1e6
            return {
                "requests": raw["requests"],
                "duration_s": duration_s,
                "requests_per_s": raw["requests"] / duration_s if duration_s else 0.0,
                "non_2xx": raw["non_2xx"],
                "socket_errors": {k: raw[k] for k in ("connect", "read", "write", "timeout")},
                "p50_ms": raw["p50_us"] / 1000,
                "p90_ms": raw["p90_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000,
                "max_ms": raw["max_us"] / 1000,
                "mean_ms": raw["mean_us"] / 1000,
            }
    raise RuntimeError(f"wrk printed no summary:\n{output}")


def httpx_load(
    url: str,
    bodies_path: str,
    connections: int,
    duration_s: float,
    *,
    pause_ms: int,
    stopping: Any,
    results: Any,
) -> None:
    """The fallback load generator (a child process): `connections` keep-alive httpx clients
    posting the bodies in turn; the same figures as wrk's summary."""
    bodies = Path(bodies_path).read_bytes().splitlines()
    headers = {"content-type": "application/json"}
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    non_2xx = 0

    async def worker(offset: int, deadline: float) -> None:
        nonlocal non_2xx
        index = offset
        async with httpx.AsyncClient(timeout=10) as client:
            while time.monotonic() < deadline and not stopping.is_set():
                body = bodies[index % len(bodies)]
                index += 1
                started = time.perf_counter()
                try:
                    response = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] += 1
                    continue
                latencies.append((time.perf_counter() - started) * 1000)
                if not response.is_success:
                    non_2xx += 1
                if pause_ms:
                    await asyncio.sleep(pause_ms / 1000)

    async def main() -> float:
        started = time.perf_counter()
        deadline = time.monotonic() + duration_s
        await asyncio.gather(*(worker(i, deadline) for i in range(connections)))
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    results.put(
        {
            "requests": len(latencies),
            "duration_s": elapsed,
            "requests_per_s": len(latencies) / elapsed,
            "non_2xx": non_2xx,
            "socket_errors": dict(errors),
            "p50_ms": percentile(latencies, 0.50),
            "p90_ms": percentile(latencies, 0.90),
            "p99_ms": percentile(latencies, 0.99),
            "max_ms": max(latencies, default=math.nan),
            "mean_ms": sum(latencies) / len(latencies) if latencies else math.nan,
        }
    )


# --- the server and the OTLP receiver -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """`cco-exporter serve` in a subprocess, its output in `<name>.log` beside its database."""

    def __init__(
        self, tmp: Path, name: str, otlp_base: str | None = None, *, heartbeat: bool = False
    ) -> None:
        self.name = name
        self.db = tmp / f"{name}.db"
        self.log = tmp / f"{name}.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        # Nothing of the caller's exporter or OTel configuration leaks in.
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("CCO_EXPORTER_", "OTEL_"))
        }
        self.env["XDG_CONFIG_HOME"] = str(tmp / "config")
        if not heartbeat:
            self.env["CCO_EXPORTER_HEARTBEAT_INTERVAL"] = "0"
        if otlp_base is not None:
            self.env.update(CCO_EXPORTER_OTLP_ENDPOINT=otlp_base, CCO_EXPORTER_OTLP_INTERVAL="1")
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Server:
        command = [sys.executable, "-m", "exporter", "serve", "--host", "127.0.0.1"]
        command += ["--port", self.url.rsplit(":", 1)[1], "--db", str(self.db)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited at start:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/api/metrics/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer within {START_TIMEOUT_S}s:\n{self.logs()}")

    def stop(self) -> int | None:
        """SIGTERM and wait for the drain; kill if it hangs. The exit code (None if killed)."""
        self.client.close()
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return None
        return self.process.returncode

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def health(self) -> dict[str, Any]:
        response = self.client.get("/api/metrics/health")
        response.raise_for_status()
        health: dict[str, Any] = response.json()
        return health

    def counted(self) -> dict[str, int]:
        """What /metrics says the server took in: events ingested over HTTP, calls in the views."""
        text = self.client.get("/metrics").text
        return {
            "ingested": round(prometheus_sum(text, "cco_exporter_events_ingested_total")),
            "calls": round(prometheus_sum(text, "cco_llm_requests_total")),
        }

    def query(self, sql: str) -> Any:
        """One value, read beside the writer (WAL)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            return conn.execute(sql).fetchone()[0]
        finally:
            conn.close()

    def wait_drained(self, expected: int) -> tuple[float, dict[str, Any]]:
        """Poll health until the queue is empty and `expected` events are written: (the
        perf_counter then, the health)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while True:
            health = self.health()
            if health["queue_depth"] == 0 and health["events_written"] >= expected:
                return time.perf_counter(), health
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not drained within {DRAIN_TIMEOUT_S}s: {health}")
            time.sleep(0.01)

    def settle(self) -> tuple[float, dict[str, Any], dict[str, int]]:
        """After a load: wait until the counts stop changing (a request the client stopped
        waiting for may still be waiting for room in the queue) and all is written. Returns the
        perf_counter when it was first drained with the final counts, the health, the counts."""
        previous: tuple[float, dict[str, Any], dict[str, int]] | None = None
        while True:
            counted = self.counted()
            drained, health = self.wait_drained(counted["ingested"])
            if previous is not None and previous[2] == counted:
                return previous
            previous = (drained, health, counted)
            time.sleep(0.5)


def prometheus_sum(text: str, name: str) -> float:
    """The sum of every sample of `name` in a text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


#: tests/otlp_receiver.Receiver in a child process: prints its base URL, then answers each
#: line on stdin with the number of exports so far and the calls in the last one.
RECEIVER_CHILD = """\
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.otlp_receiver import Receiver

receiver = Receiver()
print(receiver.base, flush=True)
for _ in sys.stdin:
    requests = list(receiver.requests)
    calls = 0
    if requests:
        for resource in requests[-1].resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "cco.llm.requests":
                        calls += sum(p.as_int or p.as_double for p in metric.sum.data_points)
    print(json.dumps({"exports": len(requests), "last_export_calls": calls}), flush=True)
receiver.stop()
"""


class OtlpReceiver:
    """The OTLP/HTTP receiver of the tests, in its own process so that decoding each export
    costs the bench process (which times reads) nothing."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", RECEIVER_CHILD, str(REPO)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.base = self.process.stdout.readline().strip()
        if not self.base.startswith("http://"):
            raise RuntimeError("the OTLP receiver did not start")

    def stats(self) -> dict[str, int]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        stats: dict[str, int] = json.loads(self.process.stdout.readline())
        return stats

    def wait_for_calls(self, calls: int, exports_before: int) -> dict[str, int]:
        """The receiver's figures once an export newer than `exports_before` carries `calls`."""
        deadline = time.monotonic() + OTLP_WAIT_S
        while True:
            stats = self.stats()
            if stats["exports"] > exports_before and stats["last_export_calls"] == calls:
                return stats
            if time.monotonic() > deadline:
                return stats
            time.sleep(0.2)

    def stop(self) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


# --- helpers --------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


LOG_PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b")


def log_problems(server: Server) -> list[str]:
    """Lines of the server's log that are warnings, errors or tracebacks."""
    return [line for line in server.logs().splitlines() if LOG_PROBLEM.search(line)]


class Run:
    """Everything one bench run starts, stopped in reverse order at the end, even on failure."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.stack = contextlib.ExitStack()
        self.receiver: OtlpReceiver | None = None
        self.problems: dict[str, list[str]] = {}
        self.exit_codes: dict[str, int | None] = {}

    def otlp(self) -> OtlpReceiver:
        if self.receiver is None:
            self.receiver = OtlpReceiver()
            self.stack.callback(self.receiver.stop)
        return self.receiver

    def server(self, name: str) -> Server:
        server = Server(self.tmp, name, self.otlp().base)
        self.stack.callback(self.stop_server, server)
        return server.start()

    def stop_server(self, server: Server) -> int | None:
        """Stop `server` once (later calls are no-ops); keep its exit code and log problems."""
        if server.name not in self.exit_codes:
            self.exit_codes[server.name] = server.stop()
            self.problems[server.name] = log_problems(server)
        return self.exit_codes[server.name]

    def load(self, server: Server, bodies: Path, **kwargs: Any) -> Load:
        load = Load(server.url, bodies, client=self.args.client, **kwargs)
        self.stack.callback(load.stop)
        return load.start()


def note(step: str, started: float) -> None:
    print(f"  {step}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


# --- 1. single-event POST -------------------------------------------------------------------


def bench_single(run: Run, bodies: Path) -> dict[str, Any]:
    args = run.args
    server = run.server("single")
    receiver = run.otlp()
    exports_before = receiver.stats()["exports"]
    shape = {"connections": args.connections, "threads": 1}
    warm = run.load(server, bodies, duration_s=args.warmup, **shape).finish()
    rounds = [
        run.load(server, bodies, duration_s=args.duration, **shape).finish()
        for _ in range(args.repeats)
    ]
    completed = warm["requests"] + sum(r["requests"] for r in rounds)
    _, health, counted = server.settle()
    rows = server.query("SELECT count(*) FROM api_calls")
    otlp = receiver.wait_for_calls(counted["calls"], exports_before)
    best = max(rounds, key=lambda r: r["requests_per_s"])
    # wrk stops with requests in flight that it does not count but the server may have taken:
    # at most one per connection per run.
    in_flight = counted["ingested"] - completed
    runs = 1 + len(rounds)
    result = {
        **best,
        "round_requests_per_s": [r["requests_per_s"] for r in rounds],
        "non_2xx_all_rounds": sum(r["non_2xx"] for r in [warm, *rounds]),
        "socket_errors_all_rounds": sum(sum(r["socket_errors"].values()) for r in [warm, *rounds]),
        "client_completed": completed,
        "server_ingested": counted["ingested"],
        "server_calls": counted["calls"],
        "in_flight_at_stop": in_flight,
        "counted_ok": counted["ingested"] == counted["calls"]
        and 0 <= in_flight <= args.connections * runs,
        "events_written": health["events_written"],
        "sqlite_rows": rows,
        "otlp_exports": otlp["exports"] - exports_before,
        "otlp_last_export_calls": otlp["last_export_calls"],
        "stored_ok": rows == counted["ingested"] == health["events_written"],
        "otlp_ok": otlp["last_export_calls"] == counted["calls"],
        "connections": args.connections,
        "duration_s_per_round": args.duration,
    }
    if args.profile:
        result["profile"] = profile_load(run, server, bodies, connections=args.connections)
    run.stop_server(server)
    return result


def profile_load(
    run: Run, server: Server, bodies: Path, *, connections: int, threads: int = 1
) -> dict[str, Any]:
    """py-spy record of the server under a load of `bodies`, only samples holding the GIL: the
    work of the event loop and the writer thread, which share one core's worth of Python (py-spy
    takes threads blocked in C, such as aiosqlite's idle worker, for busy ones; `--gil` leaves
    them out)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists() and shutil.which(py_spy) is None:
        return {"error": "py-spy not found"}
    seconds = max(2, round(run.args.duration) - 2)
    out = run.tmp / f"{server.name}.folded.txt"
    load = run.load(
        server, bodies, connections=connections, threads=threads, duration_s=seconds + 2
    )
    time.sleep(1)
    command = [py_spy, "record", "-p", str(server.pid), "-d", str(seconds)]
    command += ["--gil", "-f", "raw", "-o", str(out)]
    spy = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    during = load.finish()
    if spy.returncode != 0 or not out.exists():
        return {"error": (spy.stderr or spy.stdout).strip()[-500:]}
    summary = summarize_folded(out.read_text(), run.args.profile_top)
    # py-spy pauses the process for each sample, so this rate is lower than the measured one.
    summary["requests_per_s_while_profiled"] = during["requests_per_s"]
    return summary


def summarize_folded(text: str, top: int) -> dict[str, Any]:
    """Own and inclusive samples per function (line numbers dropped), and own samples per
    package of the innermost frame, from py-spy's raw (folded) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
        packages[package_of(frames[-1])] += samples

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, 100 * c / total) for name, c in counter.most_common(n)]

    return {
        "samples": total,
        "own_pct": share(own, top),
        "inclusive_pct": share(inclusive, top * 2),
        "own_by_package_pct": share(packages, 12),
    }


def package_of(frame: str) -> str:
    """`f (litestar/routes/http.py)` -> litestar; `f (selectors.py)` -> selectors."""
    match = re.search(r"\(([^)]*)\)$", frame)
    where = match.group(1) if match else frame
    first = where.split("/", 1)[0]
    return first.removesuffix(".py") or where


# --- 2. batched ingest end to end -----------------------------------------------------------


def bench_batched(run: Run, bodies: Path) -> dict[str, Any]:
    args = run.args
    rounds = [batched_round(run, bodies, index) for index in range(args.repeats)]
    best = max(rounds, key=lambda r: r["committed_events_per_s"])
    result = {
        **best,
        "round_committed_events_per_s": [r["committed_events_per_s"] for r in rounds],
        "all_ok": all(r["stored_ok"] and r["otlp_ok"] and r["clean"] for r in rounds),
    }
    if args.profile:
        server = run.server("batched-profile")
        result["profile"] = profile_load(
            run, server, bodies, connections=args.batch_connections, threads=2
        )
        run.stop_server(server)
    return result


def batched_round(run: Run, bodies: Path, index: int) -> dict[str, Any]:
    args = run.args
    server = run.server(f"batched-{index}")
    receiver = run.otlp()
    exports_before = receiver.stats()["exports"]
    started = time.perf_counter()
    wrk = run.load(
        server,
        bodies,
        connections=args.batch_connections,
        threads=2,
        duration_s=args.duration,
    ).finish()
    load_ended = time.perf_counter()
    # A full queue at the end means the writer, not HTTP, set the pace (back-pressure).
    depth_at_end = server.health()["queue_depth"]
    drained, health, counted = server.settle()
    rows = server.query("SELECT count(*) FROM api_calls")
    series = server.query("SELECT count(*) FROM series")
    otlp = receiver.wait_for_calls(counted["calls"], exports_before)
    exit_code = run.stop_server(server)
    return {
        "wrk": wrk,
        "accepted": counted["ingested"],
        "calls_in_views": counted["calls"],
        "events_written": health["events_written"],
        "write_errors": health["write_errors"],
        "spill_backlog": health["spill_backlog"],
        "sqlite_rows": rows,
        "label_sets": series,
        "http_accept_events_per_s": counted["ingested"] / (load_ended - started),
        "committed_events_per_s": health["events_written"] / (drained - started),
        "drain_after_load_s": drained - load_ended,
        "queue_depth_at_load_end": depth_at_end,
        "queue_capacity": health["queue_capacity"],
        "otlp_exports": otlp["exports"] - exports_before,
        "otlp_last_export_calls": otlp["last_export_calls"],
        "stored_ok": rows == counted["ingested"] == counted["calls"] == health["events_written"],
        "otlp_ok": otlp["exports"] > exports_before and otlp["last_export_calls"] == rows,
        "clean": wrk["non_2xx"] == 0
        and not sum(wrk["socket_errors"].values())
        and health["write_errors"] == 0,
        "connections": args.batch_connections,
        "exit_code": exit_code,
    }


# --- 3. read latency under ingest load ------------------------------------------------------


def bench_reads(run: Run, bodies: Path) -> dict[str, Any]:
    args = run.args
    server = run.server("reads")
    # Data for the reads to sum over, committed before the idle phase; timing these sequential
    # POSTs tells how long one batch takes, which the paced load's pause leaves out.
    post_ms: list[float] = []
    with httpx.Client(base_url=server.url, timeout=30) as client:
        headers = {"content-type": "application/json"}
        for _ in range(5):
            for body in bodies.read_bytes().splitlines():
                started = time.perf_counter()
                client.post("/api/events", content=body, headers=headers).raise_for_status()
                post_ms.append((time.perf_counter() - started) * 1000)
    server.settle()

    phases: dict[str, Any] = {"idle": {"reads": sample_reads(server.url, args.idle_samples)}}
    cycle_ms = args.load_connections * BATCH / args.load_rate * 1000
    pause_ms = max(1, round(cycle_ms - percentile(post_ms, 0.5)))
    for phase, kwargs in (
        ("paced", {"connections": args.load_connections, "threads": 1, "pause_ms": pause_ms}),
        ("saturated", {"connections": args.batch_connections, "threads": 2}),
    ):
        load = run.load(server, bodies, duration_s=3600, **kwargs)
        time.sleep(1)
        reads = sample_reads(server.url, args.samples)
        wrk = load.finish(interrupt=True)
        phases[phase] = {
            "reads": reads,
            "load": wrk,
            "load_events_per_s": wrk["requests_per_s"] * BATCH,
            "pause_ms": kwargs.get("pause_ms", 0),
        }
    phases["asked_load_rate"] = args.load_rate
    phases["sequential_batch_post_p50_ms"] = percentile(post_ms, 0.5)
    run.stop_server(server)
    return phases


def sample_reads(url: str, samples: int, interval_s: float = 0.010) -> dict[str, Any]:
    """`samples` GETs of each read path, one request every `interval_s`, the paths in turn."""
    times: dict[str, list[float]] = {path: [] for path in READ_PATHS}
    failures: Counter[str] = Counter()
    pc = time.perf_counter
    with httpx.Client(base_url=url, timeout=10) as client:
        for path in READ_PATHS:
            client.get(path)
        next_at = pc()
        for _ in range(samples):
            for path in READ_PATHS:
                # A slow answer delays the next request instead of causing a burst.
                next_at = max(next_at + interval_s, pc())
                with contextlib.suppress(ValueError):
                    time.sleep(next_at - pc())
                started = pc()
                response = client.get(path)
                times[path].append((pc() - started) * 1000)
                if response.status_code != 200:
                    failures[path] += 1
    return {
        path: {
            "samples": len(values),
            "p50_ms": percentile(values, 0.50),
            "p95_ms": percentile(values, 0.95),
            "p99_ms": percentile(values, 0.99),
            "max_ms": max(values),
            "mean_ms": sum(values) / len(values),
            "non_200": failures[path],
        }
        for path, values in times.items()
    }


# --- 4. RSS at 10k events/s -----------------------------------------------------------------


def bench_rss(run: Run) -> dict[str, Any]:
    args = run.args
    server = run.server("rss")
    proc = psutil.Process(server.pid)
    rate_each = args.rss_rate / args.rss_clients
    env = {**server.env}
    simulators: list[subprocess.Popen[str]] = []
    for index in range(args.rss_clients):
        command = [sys.executable, "-m", "exporter", "simulate", "--rate", f"{rate_each:g}"]
        command += ["--duration", f"{args.rss_duration:g}", "--url", server.url]
        command += ["--seed", str(index + 1)]
        simulator = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        simulators.append(simulator)
        run.stack.callback(kill_quietly, simulator)
    started = time.monotonic()
    samples = [(0.0, tree_rss(proc))]
    while any(s.poll() is None for s in simulators):
        time.sleep(min(5.0, max(0.0, started + 5 * len(samples) - time.monotonic())))
        samples.append((time.monotonic() - started, tree_rss(proc)))
    outputs = [s.communicate()[0] for s in simulators]
    sent = elapsed = 0.0
    for output in outputs:
        match = re.search(r"sent (\d+) events .* over ([\d.]+) s", output)
        if match is None:
            raise RuntimeError(f"simulate printed no summary:\n{output}")
        sent += int(match.group(1))
        elapsed = max(elapsed, float(match.group(2)))
    _, _, counted = server.settle()
    samples.append((time.monotonic() - started, tree_rss(proc)))
    models = server.client.get("/api/metrics/models").json()["models"]
    metrics_text = server.client.get("/metrics").text
    high_water = high_water_mb(server.pid)
    run.stop_server(server)
    mb = [rss / 2**20 for _, rss in samples]
    return {
        "asked_events_per_s": args.rss_rate,
        "achieved_events_per_s": sent / elapsed if elapsed else 0.0,
        "sent": int(sent),
        "simulate_outputs": [o.strip() for o in outputs],
        "start_rss_mb": mb[0],
        "max_rss_mb": max(mb),
        "final_rss_mb": mb[-1],
        "high_water_rss_mb": high_water,
        "samples": [(round(t, 1), round(m, 1)) for (t, _), m in zip(samples, mb, strict=True)],
        "label_sets": server.query("SELECT count(*) FROM series"),
        "exposed_label_sets": sum(
            1
            for line in metrics_text.splitlines()
            if line.startswith("cco_llm_requests_total{") and 'status="ok"' in line
        ),
        "models": len(models),
        "accepted": counted["ingested"],
        "duration_s": args.rss_duration,
        "clients": args.rss_clients,
    }


def tree_rss(proc: psutil.Process) -> int:
    """RSS of the server and its children (the writer process), bytes."""
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total


def high_water_mb(pid: int) -> float | None:
    """The kernel's peak RSS (VmHWM), which 5-second samples can miss, of `pid` plus each of
    its children's."""
    pids = [pid]
    with contextlib.suppress(psutil.Error):
        pids += [child.pid for child in psutil.Process(pid).children(recursive=True)]
    total = 0.0
    for one in pids:
        try:
            status = Path(f"/proc/{one}/status").read_text()
        except OSError:
            if one == pid:
                return None
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match is None:
            return None
        total += int(match.group(1)) / 1024
    return total


def kill_quietly(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


# --- the report -----------------------------------------------------------------------------


Row = tuple[str, str, str, bool | None]


def table_rows(r: dict[str, Any]) -> list[Row]:
    """The rows of every section that ran, then the server logs' verdict."""
    sections: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
        "single": single_rows,
        "batched": batched_rows,
        "reads": read_rows,
        "rss": rss_rows,
    }
    rows = [row for name, rows_of in sections.items() if name in r for row in rows_of(r[name])]
    problems = sum(len(lines) for lines in r["server_log_problems"].values())
    bad_exits = [name for name, code in r["server_exit_codes"].items() if code != 0]
    rows.append(
        (
            "server logs: warning/error lines; bad exits",
            f"{problems}; {', '.join(bad_exits) or 'none'}",
            "0; none",
            problems == 0 and not bad_exits,
        )
    )
    return rows


def single_rows(s: dict[str, Any]) -> list[Row]:
    return [
        (
            f"single-event POST, events/s (-c{s['connections']}, best of"
            f" {len(s['round_requests_per_s'])})",
            f"{s['requests_per_s']:,.0f}",
            f">= {TARGET_SINGLE_PER_S:,}",
            s["requests_per_s"] >= TARGET_SINGLE_PER_S,
        ),
        (
            "  each round, events/s",
            " / ".join(f"{v:,.0f}" for v in s["round_requests_per_s"]),
            "",
            None,
        ),
        ("  latency p50 / p99, ms", f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f}", "", None),
        (
            "  non-2xx / socket errors (all rounds)",
            f"{s['non_2xx_all_rounds']} / {s['socket_errors_all_rounds']}",
            "0 / 0",
            s["non_2xx_all_rounds"] == 0 and s["socket_errors_all_rounds"] == 0,
        ),
        (
            "  server counted = client completed + in flight",
            f"{s['server_ingested']:,} = {s['client_completed']:,} + {s['in_flight_at_stop']}",
            "equal",
            s["counted_ok"],
        ),
        (
            "  SQLite rows = counted; last OTLP export",
            f"{s['sqlite_rows']:,}; {s['otlp_last_export_calls']:,}",
            "equal",
            s["stored_ok"] and s["otlp_ok"],
        ),
    ]


def batched_rows(b: dict[str, Any]) -> list[Row]:
    return [
        (
            f"batched end to end, committed events/s (-c{b['connections']}, best of"
            f" {len(b['round_committed_events_per_s'])})",
            f"{b['committed_events_per_s']:,.0f}",
            f">= {TARGET_BATCHED_PER_S:,}",
            b["committed_events_per_s"] >= TARGET_BATCHED_PER_S and b["all_ok"],
        ),
        (
            "  each round, events/s",
            " / ".join(f"{v:,.0f}" for v in b["round_committed_events_per_s"]),
            "",
            None,
        ),
        (
            "  HTTP accept events/s; drain after load, s",
            f"{b['http_accept_events_per_s']:,.0f}; {b['drain_after_load_s']:.2f}",
            "",
            None,
        ),
        (
            "  write queue at load end / capacity",
            f"{b['queue_depth_at_load_end']:,} / {b['queue_capacity']:,}",
            "",
            None,
        ),
        (
            "  wrk p50 / p99 per 1000-event POST, ms",
            f"{b['wrk']['p50_ms']:.1f} / {b['wrk']['p99_ms']:.1f}",
            "",
            None,
        ),
        (
            "  non-2xx / socket / write errors",
            f"{b['wrk']['non_2xx']} / {sum(b['wrk']['socket_errors'].values())}"
            f" / {b['write_errors']}",
            "0 / 0 / 0",
            b["clean"],
        ),
        (
            "  SQLite rows = accepted = written",
            f"{b['sqlite_rows']:,} = {b['accepted']:,} = {b['events_written']:,}",
            "equal",
            b["stored_ok"],
        ),
        (
            "  OTLP exports; calls in the last; label sets",
            f"{b['otlp_exports']}; {b['otlp_last_export_calls']:,}; {b['label_sets']}",
            "= rows",
            b["otlp_ok"],
        ),
    ]


def read_rows(rd: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    paced = rd["paced"]
    stats_p99 = paced["reads"]["/api/metrics/stats"]["p99_ms"]
    rows.append(
        (
            f"/api/metrics/stats p99, ms, at {paced['load_events_per_s']:,.0f} events/s",
            f"{stats_p99:.2f}",
            f"< {TARGET_STATS_P99_MS:g}",
            stats_p99 < TARGET_STATS_P99_MS,
        )
    )
    saturated = rd["saturated"]["load_events_per_s"]
    rows.append(
        (
            f"  GET p50/p95/p99/max ms: idle | paced | unpaced ({saturated:,.0f}/s)",
            "",
            "",
            None,
        )
    )
    for path in READ_PATHS:
        cells = []
        for phase in ("idle", "paced", "saturated"):
            q = rd[phase]["reads"][path]
            cells.append(f"{q['p50_ms']:.1f}/{q['p95_ms']:.1f}/{q['p99_ms']:.1f}/{q['max_ms']:.0f}")
        rows.append((f"  {path}", " | ".join(cells), "", None))
    failed_reads = sum(
        q["non_200"]
        for phase in ("idle", "paced", "saturated")
        for q in rd[phase]["reads"].values()
    )
    rows.append(("  reads not answered 200", f"{failed_reads}", "0", failed_reads == 0))
    return rows


def rss_rows(m: dict[str, Any]) -> list[Row]:
    achieved_ok = m["achieved_events_per_s"] >= RATE_TOLERANCE * m["asked_events_per_s"]
    return [
        (
            f"RSS max, MB, {m['duration_s']:g} s at {m['asked_events_per_s']:,.0f} events/s",
            f"{m['max_rss_mb']:.1f}",
            f"< {TARGET_RSS_MB:g}",
            m["max_rss_mb"] < TARGET_RSS_MB and achieved_ok,
        ),
        (
            "  RSS start / final / peak (VmHWM), MB",
            f"{m['start_rss_mb']:.1f} / {m['final_rss_mb']:.1f}"
            f" / {m['high_water_rss_mb'] or math.nan:.1f}",
            "",
            None,
        ),
        (
            "  achieved events/s (simulate)",
            f"{m['achieved_events_per_s']:,.0f}",
            f">= {RATE_TOLERANCE * m['asked_events_per_s']:,.0f}",
            achieved_ok,
        ),
        (
            "  label sets stored / exposed; models",
            f"{m['label_sets']} / {m['exposed_label_sets']}; {m['models']}",
            "",
            None,
        ),
    ]


def print_table(header: str, rows: list[Row]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(header)
    line = f"{'measure':<{widths[0]}}  {'value':>{widths[1]}}  {'target':<{widths[2]}}  ok"
    print(line)
    print("-" * len(line))
    for name, value, target, ok in rows:
        mark = "" if ok is None else ("PASS" if ok else "FAIL")
        print(f"{name:<{widths[0]}}  {value:>{widths[1]}}  {target:<{widths[2]}}  {mark}")


def print_profile(what: str, profile: dict[str, Any]) -> None:
    if "error" in profile:
        print(f"\npy-spy failed: {profile['error']}")
        return
    print(
        f"\npy-spy --gil of the server during {what}: {profile['samples']} samples holding the"
        f" GIL ({profile['requests_per_s_while_profiled']:,.0f} requests/s while sampled)"
    )
    for title, key in (
        ("own samples by package", "own_by_package_pct"),
        ("own samples", "own_pct"),
        ("inclusive samples", "inclusive_pct"),
    ):
        print(f"\n  {title}:")
        for name, pct in profile[key]:
            print(f"  {pct:5.1f}%  {name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--duration", type=float, help="seconds per load round (10; quick: 4)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up POSTs (2; quick: 1)")
    parser.add_argument(
        "--repeats", type=int, help="rounds of (1) and (2), best kept (3; quick: 1)"
    )
    parser.add_argument("--connections", type=int, default=16, help="wrk connections for (1)")
    parser.add_argument(
        "--batch-connections", type=int, default=4, help="wrk connections for batched load (4)"
    )
    parser.add_argument(
        "--load-rate",
        type=float,
        default=50_000,
        help="events/s of the paced load behind the read latencies (50,000)",
    )
    parser.add_argument(
        "--load-connections", type=int, default=2, help="connections of the paced load (2)"
    )
    parser.add_argument("--samples", type=int, help="GETs per path under load (500; quick: 100)")
    parser.add_argument("--idle-samples", type=int, help="GETs per path idle (200; quick: 50)")
    parser.add_argument("--rss-rate", type=float, default=10_000, help="events/s for RSS")
    parser.add_argument("--rss-duration", type=float, help="seconds of the RSS run (60; quick: 15)")
    parser.add_argument(
        "--rss-clients", type=int, default=1, help="simulate processes sharing the rate (1)"
    )
    parser.add_argument(
        "--client",
        choices=("auto", "wrk", "httpx"),
        default="auto",
        help="load generator: wrk if installed (auto), or the httpx fallback",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=STEPS,
        default=list(STEPS),
        help="run only these measures (all: %(default)s)",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy (1) and (2) once more")
    parser.add_argument("--profile-top", type=int, default=15, help="frames listed per profile")
    parser.add_argument("--tmpdir", help="where the databases and logs go (default: system)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="the JSON file")
    args = parser.parse_args(argv)
    defaults = {
        "duration": (10.0, 4.0),
        "warmup": (2.0, 1.0),
        "repeats": (3, 1),
        "samples": (500, 100),
        "idle_samples": (200, 50),
        "rss_duration": (60.0, 15.0),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "httpx"
        if args.client == "httpx":
            print(
                "NOTE: wrk is not installed (Debian/Ubuntu: apt-get install wrk); falling back"
                " to an httpx client, which is likely the bottleneck: the figures are a floor.",
                file=sys.stderr,
                flush=True,
            )
    return args


def run_all(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rng = random.Random(1)
    single = write_bodies(
        tmp / "single.txt", [msgspec.json.encode(e) for e in make_events(rng, 200)]
    )
    batched = write_bodies(
        tmp / "batched.txt", [msgspec.json.encode(make_events(rng, BATCH)) for _ in range(20)]
    )
    run = Run(args, tmp)
    results: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("single", lambda: bench_single(run, single)),
        ("batched", lambda: bench_batched(run, batched)),
        ("reads", lambda: bench_reads(run, batched)),
        ("rss", lambda: bench_rss(run)),
    ]
    with run.stack:
        for name, step in steps:
            if name not in args.only:
                continue
            started = time.perf_counter()
            results[name] = step()
            note(name, started)
    results["server_log_problems"] = run.problems
    results["server_exit_codes"] = run.exit_codes
    return results


def wrk_version() -> str | None:
    if shutil.which("wrk") is None:
        return None
    output = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout
    return output.splitlines()[0] if output else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    machine = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "load_client": args.client,
        "wrk": wrk_version(),
        # Other processes on the machine skew every figure; the load says how busy it was.
        "load_avg_at_start": os.getloadavg(),
    }
    print(
        f"cco-exporter HTTP bench: {machine['cpu_count']} CPUs, Python {machine['python']},"
        f" load client {args.client}{' (quick)' if args.quick else ''}",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cco-bench-http-", dir=args.tmpdir) as tmp:
        results = run_all(args, Path(tmp))
    elapsed = time.perf_counter() - started
    machine["load_avg_at_end"] = os.getloadavg()

    rows = table_rows(results)
    header = (
        f"\ncco-exporter HTTP bench — {machine['cpu_count']} CPUs, Python {machine['python']},"
        f" {args.client}{', QUICK' if args.quick else ''}, {elapsed:.0f} s,"
        f" load avg {machine['load_avg_at_start'][0]:.2f} -> {machine['load_avg_at_end'][0]:.2f}\n"
    )
    print_table(header, rows)
    for name, what in (("single", "single-event POSTs"), ("batched", "1000-event POSTs")):
        if "profile" in results.get(name, {}):
            print_profile(what, results[name]["profile"])
    for name, lines in results["server_log_problems"].items():
        if lines:
            print(f"\nserver log of {name} ({len(lines)} warning/error lines), first ones:")
            for line in lines[:10]:
                print(f"  {line}")

    report = {
        "bench": "bench_http",
        "quick": args.quick,
        "elapsed_s": elapsed,
        "machine": machine,
        "params": {
            key: value for key, value in vars(args).items() if key not in ("output", "tmpdir")
        },
        "targets": [
            {"measure": name, "value": value, "target": target, "passed": ok}
            for name, value, target, ok in rows
            if ok is not None
        ],
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
