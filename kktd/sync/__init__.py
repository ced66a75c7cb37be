"""Forwarding buffered receipts upstream: the loop (loop.py), the delivery policy (policy.py), the breaker
(breaker.py)."""

from kktd.sync.breaker import BreakerState, CircuitBreaker
from kktd.sync.loop import ManualCycle, SyncLoop, SyncStatus
from kktd.sync.policy import DeliveryPolicy

__all__ = ["BreakerState", "CircuitBreaker", "DeliveryPolicy", "ManualCycle", "SyncLoop", "SyncStatus"]
