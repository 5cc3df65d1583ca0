"""The trigger behind ``wait_for_metrics``: polls Prometheus in the triggerer, not in a worker slot.

Every ``poll_seconds`` it reads the stage's hard guards, the live requests served per arm and
the GPU gauges (one thread-pool call: the library's Prometheus client is synchronous), and
fires one event: ``breach`` at the first tripped guard, ``ready`` once the bake time has passed,
each arm has its minimum samples and ``not_before`` seconds have passed, ``timeout`` after
``max_stage_seconds``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class StageMetricsTrigger(BaseTrigger):
    def __init__(
        self,
        params: dict[str, Any],
        weight: int,
        started: float,
        prometheus_url: str,
        not_before: float = 0.0,  # seconds into the stage: the next look after a "wait" verdict
        poll_seconds: float = 2.0,
    ):
        super().__init__()
        self.params, self.weight, self.started = params, weight, started
        self.prometheus_url, self.not_before, self.poll_seconds = prometheus_url, not_before, poll_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "params": self.params, "weight": self.weight, "started": self.started,
            "prometheus_url": self.prometheus_url, "not_before": self.not_before, "poll_seconds": self.poll_seconds,
        })  # fmt: skip

    def look(self) -> dict[str, Any] | None:
        """One blocking read (run in a thread, imports included: pandas and scipy load slowly):
        the event, or None while the stage bakes."""
        from include.rollout.controller import bake_status
        from include.rollout.metrics import PrometheusSource
        from include.rollout.spec import RolloutSpec

        spec = RolloutSpec.from_dict(self.params)
        status = bake_status(PrometheusSource(self.prometheus_url), spec, self.weight, self.started)
        state = status.state(spec, self.not_before)
        self.log.info("stage %d%%: %s: %s", self.weight, state, status.describe())
        return None if state == "waiting" else {"status": state, **status.to_dict()}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while (event := await asyncio.to_thread(self.look)) is None:
            await asyncio.sleep(self.poll_seconds)
        yield TriggerEvent(event)
