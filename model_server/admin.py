"""The admin calls without their transport: traffic policies, loads and unloads, fault
injection, and the watched traffic file. The HTTP layer checks the admin token before any."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from model_server import metrics
from model_server.errors import (
    EveryInterval,
    InvalidInput,
    ModelUnavailable,
    PolicyError,
    ServerError,
    StateNotSaved,
)
from model_server.model import Fault
from model_server.repository import ModelRepository
from model_server.traffic import PolicyStore, TrafficPolicy, default_policy, read_traffic_file

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelLocks:
    """One asyncio lock per model name, kept while a call holds or waits for it (any name may
    be asked, and most are asked once)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # name -> (lock, its holder and waiters)

    @asynccontextmanager
    async def hold(self, model: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(model) or (asyncio.Lock(), 0)
        self._locks[model] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[model]
            if users == 1:
                del self._locks[model]
            else:
                self._locks[model] = (lock, users - 1)


class Admin:
    """Changes what serves: the traffic policies and the loaded versions the data plane serves
    from. A policy must name loaded versions, and a load or unload must keep them.

    Each change of a model runs whole under the model's lock: a policy is checked against the
    loaded versions and applied, a load or unload reads the versions the policy keeps and
    swaps, and neither sees the state from before the other (both would pass, and the policy
    would route to a version the load left out)."""

    def __init__(self, repo: ModelRepository, policies: PolicyStore):
        self.repo = repo
        self.policies = policies
        self._locks = ModelLocks()
        self._changes: set[asyncio.Future[Any]] = set()
        self._unsaved_lines = EveryInterval(60.0)  # (a traffic file tried again at every poll)

    async def _changing(self, models: Iterable[str], change: Callable[[], Awaitable[T]]) -> T:
        """``change()`` holding the models' locks (in name order) until it ends, even when the
        call that awaits it is cancelled: a load in its thread keeps them to its end."""

        async def locked() -> T:
            async with AsyncExitStack() as stack:
                for model in sorted(set(models)):
                    await stack.enter_async_context(self._locks.hold(model))
                return await change()

        task = asyncio.ensure_future(locked())
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
        return await asyncio.shield(task)

    # -- traffic policy ---------------------------------------------------------------------

    def policy(self, model: str) -> TrafficPolicy:
        """The model's traffic policy; without one, the default: the highest loaded version."""
        current = self.policies.get(model)
        if current is None and model in self.policies.unreadable:  # (not the default: nothing serves it)
            raise ModelUnavailable(f"model '{model}': {self.policies.unreadable[model]}; PUT a policy to replace it")
        if current is None:
            _, loaded = self.repo.loaded(model)
            current = default_policy(loaded)
        return current

    @staticmethod
    def parse_policy(model: str, raw: object) -> TrafficPolicy:
        """``raw`` as a policy of the model; InvalidInput if not. It compiles the rules' regexes:
        run it off the event loop."""
        try:
            return TrafficPolicy.from_dict(raw)
        except PolicyError as exc:
            raise InvalidInput(f"invalid traffic policy for model '{model}': {exc}") from None

    def check_loaded(self, model: str, policy: TrafficPolicy) -> None:
        """InvalidInput unless every version the policy names is loaded (ModelNotFound for a
        model the repository lacks)."""
        loaded = self.repo.loaded_versions(model)
        if not loaded:
            self.repo.model_dir(model)
        try:
            policy.check_loaded(loaded)
        except PolicyError as exc:
            raise InvalidInput(f"invalid traffic policy for model '{model}': {exc}") from None

    async def set_policy(self, model: str, raw: object) -> None:
        policy = await asyncio.to_thread(self.parse_policy, model, raw)

        async def change() -> None:
            self.check_loaded(model, policy)
            await asyncio.to_thread(self.policies.apply, model, policy)

        await self._changing([model], change)
        log.info("traffic policy for %r: %s", model, json.dumps(policy.to_dict()))

    async def remove_policy(self, model: str) -> None:
        """Back to the default: the highest loaded version. A model with a policy may have left
        the repository (a policy restored for it kept the server not ready, and was a 404 here)."""
        if self.policies.get(model) is None:
            self.repo.model_dir(model)
        await self._changing([model], lambda: asyncio.to_thread(self.policies.remove, model))
        log.info("traffic policy for %r removed", model)

    async def watch_traffic_file(self, path: Path, poll_s: float) -> None:
        """Apply the file's policies when it changes; a bad file changes nothing."""
        seen: tuple[int, int] | None = None
        while True:
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamp = None
            if stamp is not None and stamp != seen and await self.apply_traffic_file(path):
                seen = stamp  # (a file whose state could not be written is tried again at the next poll)
            await asyncio.sleep(poll_s)

    async def apply_traffic_file(self, path: Path) -> bool:
        """Apply the file's policies, checked and applied under their models' locks, all or
        none: a bad file is counted and logged and changes nothing. False where a policy's state
        file could not be written (a full or read-only state volume: ``PolicyStore.apply_all``
        moves no policy then), to be tried again."""
        try:
            wanted = await asyncio.to_thread(read_traffic_file, path)  # parsed once, off the loop

            async def change() -> None:
                for model, policy in wanted.items():
                    self.check_loaded(model, policy)
                for model in await asyncio.to_thread(self.policies.apply_all, wanted):
                    log.info("traffic policy for %r from %s", model, path)

            await self._changing(wanted, change)
        except StateNotSaved as exc:
            metrics.TRAFFIC_FILE_ERRORS.inc()
            if (left_out := self._unsaved_lines.due()) is not None:
                log.error(
                    "traffic file not applied: %s (tried again at every poll; %d such lines left out)",
                    exc.message,
                    left_out,
                )
            return False
        except (PolicyError, ServerError) as exc:
            metrics.TRAFFIC_FILE_ERRORS.inc()
            log.error("traffic file not applied: %s", getattr(exc, "message", exc))
        except Exception:  # the watcher outlives any file: "²" as a version once ended it
            metrics.TRAFFIC_FILE_ERRORS.inc()
            log.exception("traffic file not applied")
        return True

    # -- model repository -------------------------------------------------------------------

    async def load(self, model: str, override: dict[str, Any] | None = None) -> None:
        """Load (or reload) a model, with a config override; refused (409) if it would leave out
        a version the traffic policy routes or mirrors to."""
        await self._changing(
            [model], lambda: asyncio.to_thread(self.repo.load, model, override, self.policies.versions(model))
        )

    async def unload(self, model: str) -> None:
        """Unload every version; refused (409) while the traffic policy routes to one."""
        await self._changing([model], lambda: asyncio.to_thread(self.repo.unload, model, self.policies.versions(model)))

    # -- fault injection --------------------------------------------------------------------

    def fault(self, model: str, version: str) -> Fault:
        """The faults injected into one version (none: the zero fault)."""
        with self.repo.use(model, version) as lv:
            return lv.fault or Fault()

    def set_fault(self, model: str, version: str, raw: object) -> Fault:
        """Inject a delay or failures into one version (as Istio's fault injection does)."""
        with self.repo.use(model, version) as used:
            lv = self.repo.set_fault(used, Fault.from_dict(raw))
            log.warning(
                "fault injection on %r version %s: %s",
                lv.name,
                lv.label,
                lv.fault.to_dict() if lv.fault else "cleared",
            )
            return lv.fault or Fault()
