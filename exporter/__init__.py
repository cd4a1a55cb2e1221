"""cco-exporter: live and historical cost of LLM API calls, from one local process."""

from __future__ import annotations

#: Set before the imports below, so every module may `from exporter import __version__`.
__version__ = "0.1.0"

from exporter.aggregator import Aggregator, WindowSnapshot
from exporter.engine import Exporter, QueueFull
from exporter.events import (
    ApiCall,
    CacheHit,
    CacheMiss,
    ErrorEvent,
    Event,
    EventValidationError,
    ModelOverride,
    SystemEvent,
    decode_batch,
    decode_event,
)
from exporter.pricing import Price, PricingTable
from exporter.settings import Settings

__all__ = [
    "Aggregator",
    "ApiCall",
    "CacheHit",
    "CacheMiss",
    "ErrorEvent",
    "Event",
    "EventValidationError",
    "Exporter",
    "ModelOverride",
    "Price",
    "PricingTable",
    "QueueFull",
    "Settings",
    "SystemEvent",
    "WindowSnapshot",
    "decode_batch",
    "decode_event",
]
