"""CPU stand-ins for CUDA streams and events, which MCore uses to order work (installed by
:mod:`mimo_builder._internal.platform.compat`'s ``device_queries``): on CPU work is already ordered."""

from __future__ import annotations


class NullStream:
    """Stands in for a CUDA stream on CPU: work is already ordered, so every call is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other) -> None:
        """Nothing to wait for."""

    def wait_event(self, event) -> None:
        """Nothing to wait for."""

    def record_event(self, event=None):
        """``event``, or a new already complete one."""
        return event if event is not None else NullEvent()

    def synchronize(self) -> None:
        """Nothing to wait for."""


class NullEvent:
    """Stands in for a CUDA event on CPU (MoE token dispatch waits on one): already complete."""

    def synchronize(self) -> None:
        """Nothing to wait for."""

    def wait(self, stream=None) -> None:
        """Nothing to wait for."""

    def query(self) -> bool:
        """Always complete."""
        return True
