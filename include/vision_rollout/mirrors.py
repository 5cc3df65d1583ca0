"""The mirror's history of a model as the rollout applied it through Istio: one small record a
change (its time, the model, the mirrored version, the percent) in the run folder, which every
worker shares (a volume every worker mounts, or an object store), read by the hourly shadow
audit. In kubernetes mode Envoy mirrors and the model server's pods serve without a traffic
policy: no ``model_server_mirror_percent`` gauge says what was mirrored, and Istio's metrics
name no mirror share either (``istio_requests_total`` counts the copies, not the share asked
for). Each read is bounded: one listing, and at most ``MAX_CHANGES`` records of a range read."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from vision_rollout.folders import Folder

log = logging.getLogger(__name__)

MAX_CHANGES = 240  # the records of one range read at most (an hour holds a rollout's few)
MAX_RECORD_BYTES = 4096
SETTLE_S = 300.0  # a record this young may be a rollout's, its routes not yet written (``observe``)
NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z\.json")  # (the change's time: the names sort as the changes)


@dataclass(frozen=True)
class MirrorChange:
    """The mirror ``model``'s routes carry from ``at`` (a ``time.time()``) on: ``percent`` of its
    requests copied to ``version`` (None and 0: no mirror)."""

    at: float
    model: str
    version: str | None
    percent: float

    @classmethod
    def from_json(cls, data: bytes) -> MirrorChange:
        raw = json.loads(data)
        version = raw["version"]
        change = cls(
            float(raw["at"]), str(raw["model"]), None if version is None else str(version), float(raw["percent"])
        )
        if not 0 <= change.percent <= 100 or change.at != change.at:
            raise ValueError(f"not a mirror change: percent {change.percent}, at {change.at}")
        return change


def _name(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y%m%dT%H%M%S.%fZ") + ".json"


def _at(name: str) -> float:
    return datetime.strptime(name.removesuffix(".json"), "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class MirrorLog:
    """A model's mirror changes, below the run folder (``mirror_log``)."""

    folder: Folder
    model: str
    clock: Callable[[], float] = time.time

    def _names(self) -> list[str]:
        return [n for n in self.folder.names() if NAME.fullmatch(n)]

    def _read(self, name: str) -> MirrorChange | None:
        """The change ``name`` holds; None (a warning) for a record that is not one."""
        try:
            return MirrorChange.from_json(self.folder.read_within(name, MAX_RECORD_BYTES))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # (JSON nested past Python's limit)
            log.warning("mirror record %s/%s is not one the rollout wrote: %s", self.folder, name, str(exc)[:200])
            return None

    def last(self) -> MirrorChange | None:
        """The newest change recorded; None when none is."""
        names = self._names()
        return self._read(names[-1]) if names else None

    def record(self, version: str | None, percent: float) -> MirrorChange:
        """The mirror from now on: ``percent`` to ``version`` (0: none). OSError when it cannot be written."""
        change = MirrorChange(self.clock(), self.model, version if percent else None, float(percent))
        self.folder.write(_name(change.at), json.dumps(asdict(change)).encode())
        return change

    def observe(self, version: str | None, percent: float, settle_s: float = SETTLE_S) -> MirrorChange | None:
        """The mirror read from the routes now (``percent`` to ``version``), recorded when it is
        not the last recorded: a change no rollout recorded (made by hand). Not when the last
        record is younger than ``settle_s`` (a rollout records a raised mirror just before it
        writes the routes), nor a mirror of 0 with none recorded. The change recorded, or None.
        OSError when the records cannot be read or written."""
        last = self.last()
        now = (version if percent else None, float(percent))
        if last is None and not percent:
            return None
        if last is not None and ((last.version, last.percent) == now or self.clock() - last.at < settle_s):
            return None
        return self.record(version, percent)

    def shares(self, start: float, end: float, step: float) -> list[tuple[float, float]] | None:
        """The mirror's percent from ``start`` to ``end`` (``time.time()``s) a sample every
        ``step`` (as Prometheus samples the model server's gauge), from the change in force at
        ``start`` and those within; no sample before the first change recorded (not known), nor
        after the first of the range's changes beyond ``MAX_CHANGES``. None when none is known."""
        names = self._names()
        before = [n for n in names if _at(n) <= start][-1:]
        inside = [n for n in names if start < _at(n) <= end]
        known_to = _at(inside[MAX_CHANGES]) if len(inside) > MAX_CHANGES else end
        if len(inside) > MAX_CHANGES:
            log.warning("%d mirror changes of '%s' in a range: read to %s", len(inside), self.model, known_to)
        changes = [c for c in map(self._read, before + inside[:MAX_CHANGES]) if c is not None]
        samples: list[tuple[float, float]] = []
        k = 0
        while (t := start + k * step) <= known_to:
            in_force = [c.percent for c in changes if c.at <= t]
            if in_force:
                samples.append((t, in_force[-1]))
            k += 1
        return samples or None

    def prune(self, before: float, limit: int, dry_run: bool = False) -> list[str]:
        """The changes older than ``before`` removed, the oldest ``limit`` at most, but the newest
        of them: the mirror in force at ``before``. Their names (``dry_run``: of those that
        would go, nothing removed). What removals killed mid-way left of changes (their guard
        files) older than ``before`` goes too."""
        old = [n for n in self._names() if _at(n) < before][:-1][:limit]
        for name in [] if dry_run else old:
            self.folder.delete(name)
        self.folder.remove_temporaries(NAME.fullmatch, before, dry_run)
        return old


def mirror_log(run_folder: Folder, model: str) -> MirrorLog:
    """``model``'s mirror changes in the run folder: ``mirrors/<model>/``."""
    return MirrorLog(run_folder / "mirrors" / model, model)
