"""A real OTLP/HTTP metrics receiver on 127.0.0.1 for tests: bodies decoded with
opentelemetry-proto."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

__all__ = ["Receiver"]


class Receiver:
    """ThreadingHTTPServer on 127.0.0.1 taking POST /v1/metrics; `mode` says how it answers:
    ok (decode and store), 500, slow (wait `delay` s, then ok), trickle (a 200 whose body never
    finishes until `release`)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay = 0.0
        self.requests: list[ExportMetricsServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.release = threading.Event()
        self.stopped = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                if receiver.stopped:
                    # A kept-alive connection outlives server_close(): drop it unanswered, as a
                    # collector that went away would.
                    self.close_connection = True
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.headers.append(dict(self.headers))
                # The client may have given up (its timeout): what the slow modes are for.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    receiver.answer(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1/metrics"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def answer(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        if handler.path != "/v1/metrics":
            handler.send_response(404)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if self.mode == "500":
            handler.send_response(500)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if self.mode == "trickle":
            handler.send_response(200)
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            # One byte every 0.1 s keeps every socket read inside the client's read timeout.
            while not self.release.wait(0.1):
                handler.wfile.write(b"\0")
                handler.wfile.flush()
            handler.close_connection = True
            return
        if self.mode == "slow":
            self.release.wait(self.delay)
        self.requests.append(ExportMetricsServiceRequest.FromString(body))
        reply = ExportMetricsServiceResponse().SerializeToString()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-protobuf")
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    def stop(self) -> None:
        self.stopped = True
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(8.0)
