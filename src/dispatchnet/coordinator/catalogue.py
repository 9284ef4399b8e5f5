"""The task names a quote may ask for: the built-in catalogue, plus every name a worker has
declared in its Hello (kept durably, the MAX_DECLARED_TASKS most recently declared).

A quote for any other name would only wait out the queue timeout, so it is refused at
once, naming the known tasks.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Iterable

from dispatchnet.coordinator.ports import WorkerRegistry
from dispatchnet.errors import FailedPrecondition

MAX_DECLARED_TASKS = 1024  # names kept; the least recently declared go first
MAX_LISTED = 20  # known names an error message lists


class TaskCatalogue:
    def __init__(
        self,
        store: WorkerRegistry,
        builtin: Iterable[str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.builtin = frozenset(builtin)
        self.clock = clock
        self._seen: set[str] = set()  # declared names this process knows of (a cache)

    async def declared(self, names: Iterable[str]) -> None:
        """A worker offers these tasks (call on every Hello)."""
        new = sorted(set(names) - self.builtin)[:MAX_DECLARED_TASKS]
        if new:
            await self.store.record_task_names(new, self.clock(), MAX_DECLARED_TASKS)
            self._remember(new)

    async def check(self, name: str) -> None:
        """Raises FailedPrecondition when no worker has ever offered task `name`."""
        if name in self.builtin or name in self._seen:
            return
        if await self.store.task_name_known(name):  # declared to another coordinator, or earlier
            self._remember([name])
            return
        known = sorted(self.builtin | set(await self.store.task_names(MAX_DECLARED_TASKS)))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        listed = ", ".join(known[:MAX_LISTED])
        more = f", … ({len(known) - MAX_LISTED} more)" if len(known) > MAX_LISTED else ""
        raise FailedPrecondition(
            f'no worker has ever offered task "{name}"{hint}; known tasks: {listed}{more}'
        )

    def _remember(self, names: Iterable[str]) -> None:
        if len(self._seen) >= MAX_DECLARED_TASKS:
            self._seen.clear()  # bounded; the store stays the authority
        self._seen.update(names)
