"""`decode_batch` µs per event on realistic batches of 1000 api_call events, and what the label
check for control characters adds when a body holds escapes.

Variants (50,000 events each, best of `--repeats` rounds, as timeit does):

- plain: what `bench_core.EventMix` sends (no escape anywhere: the check is two memchr);
- one `\\u00e9` in a project per body: a backslash, but no escape that could be a control
  character, so only the escape regex runs over the body;
- one `\\n` in an unknown field per body: an escape that could be a control character, so every
  label of the batch is looked at;
- untyped: no `type` field, decoded as a list of ApiCall.

Run from the repository root: `.venv/bin/python bench/bench_decode.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_core import EventMix

from exporter.events import decode_batch

EVENTS = 50_000


def _with(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def edit(body: bytes) -> bytes:
        edited = body.replace(old, new, 1)
        assert edited != body, old
        return edited

    return edit


VARIANTS: dict[str, Callable[[bytes], bytes]] = {
    "plain": lambda body: body,
    "one \\u00e9 in a project per body": _with(b'"project":"', b'"project":"\\u00e9'),
    "one \\n in an unknown field per body": _with(
        b'{"type":"api_call",', b'{"type":"api_call","note":"a\\nb",'
    ),
    "untyped (no `type`)": lambda body: body.replace(b'"type":"api_call",', b""),
}


def per_event_us(bodies: list[bytes], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for body in bodies:
            decode_batch(body)
        best = min(best, time.perf_counter() - start)
    return best / EVENTS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    mix = EventMix(1, request_id_share=0.3, session_share=0.4)
    bodies = mix.json_batches(EVENTS, int(time.time() * 1000))
    for name, edit in VARIANTS.items():
        edited = [edit(body) for body in bodies]
        print(f"{name:40s} {per_event_us(edited, args.repeats):5.2f} µs/event")


if __name__ == "__main__":
    main()
