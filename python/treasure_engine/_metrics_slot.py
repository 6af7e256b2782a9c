"""Where a watching `Monitor` attaches its metric handles to a component (a producer, a consumer)."""

from __future__ import annotations

from typing import Generic, TypeVar

M = TypeVar("M")


class MetricsSlot(Generic[M]):
    """A component a `Monitor` can watch: it records into the handles attached here, nothing while none are."""

    __metrics: M | None = None

    @property
    def attached_metrics(self) -> M | None:
        """The metric handles a watching `Monitor` attached; None while no Monitor watches."""
        return self.__metrics

    def attach_metrics(self, metrics: M | None) -> None:
        """Records latency and batch sizes into `metrics` from now on, or nothing with None: a `Monitor`
        attaches its handles when it starts watching and detaches them when it stops."""
        self.__metrics = metrics
