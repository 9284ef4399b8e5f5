"""Connected workers indexed by what they can run, and by whether they have a free slot.

The hub keeps one WorkerIndex: it adds a session when it registers, refreshes it after
every change of its load or draining flag, and removes it when it goes. A job's candidates
are then one pool (the workers listing its task, or the desktops serving its model),
never every connected session; matching.eligible still has the last word on each one.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Generic, TypeVar

from dispatchnet.coordinator.matching import Candidate, can_ever_run
from dispatchnet.coordinator.models import JobSpec, JobType, WorkerKind

C = TypeVar("C", bound=Candidate)


class Pool(Generic[C]):
    """A set with O(1) add, remove and uniform random pick; iterates in no set order."""

    def __init__(self) -> None:
        self._items: list[C] = []
        # how many members of each kind (only kinds with members)
        self._at: dict[int, int] = {}  # id(item) -> position in _items
        self.kinds: dict[WorkerKind, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[C]:
        return iter(self._items)

    def __contains__(self, item: C) -> bool:
        return id(item) in self._at

    def add(self, item: C) -> None:
        if id(item) in self._at:
            return
        self._at[id(item)] = len(self._items)
        self._items.append(item)
        self.kinds[item.kind] = self.kinds.get(item.kind, 0) + 1

    def discard(self, item: C) -> None:
        at = self._at.pop(id(item), None)
        if at is None:
            return
        last = self._items.pop()
        if last is not item:
            self._items[at] = last
            self._at[id(last)] = at
        self.kinds[item.kind] -= 1
        if not self.kinds[item.kind]:
            del self.kinds[item.kind]

    def pick(self, rng: random.Random) -> C:
        return self._items[rng.randrange(len(self._items))]


class _Pools(Generic[C]):
    """One family of pools: by task name, LLM desktops, LLM desktops by model."""

    def __init__(self) -> None:
        self.by_task: dict[str, Pool[C]] = {}
        self.llm: Pool[C] = Pool()
        self.by_model: dict[str, Pool[C]] = {}

    def add(self, s: C) -> None:
        for t in s.tasks:
            self.by_task.setdefault(t, Pool()).add(s)
        if _serves_llm(s):
            self.llm.add(s)
            for m in s.llm_models:
                self.by_model.setdefault(m, Pool()).add(s)

    def discard(self, s: C) -> None:
        for t in s.tasks:
            _discard(self.by_task, t, s)
        if _serves_llm(s):
            self.llm.discard(s)
            for m in s.llm_models:
                _discard(self.by_model, m, s)

    def for_spec(self, spec: JobSpec) -> Pool[C] | None:
        """The smallest pool holding every worker that could run spec (None: nobody)."""
        empty: Pool[C] = Pool()
        if not spec.needs_llm:
            return self.by_task.get(spec.task_name)
        llm = self.by_model.get(spec.llm_model, empty) if spec.llm_model else self.llm
        if spec.job_type is JobType.LLM:
            return llm or None
        task = self.by_task.get(spec.task_name, empty)
        return min(llm, task, key=len) or None


def _serves_llm(s: Candidate) -> bool:
    return s.kind is WorkerKind.DESKTOP and bool(s.llm_models)


def _discard(pools: dict[str, Pool[C]], name: str, s: C) -> None:
    pool = pools.get(name)
    if pool is not None:
        pool.discard(s)
        if not pool:
            del pools[name]


class WorkerIndex(Generic[C]):
    """Sessions by capability (all of them, for quotes) and the subset with a free slot
    that is not draining (for dispatch), plus the number of free slots.

    Call refresh(s) after any change to s.load or s.draining; the cost of add, refresh and
    remove is proportional to the session's task and model lists (bounded at the edge)."""

    def __init__(self) -> None:
        self.all: _Pools[C] = _Pools()
        self.free: _Pools[C] = _Pools()
        self.free_slots = 0
        self._slots: dict[int, int] = {}  # id(session) -> its free slots (0: not free)
        self._seq: dict[int, int] = {}  # id(session) -> registration order
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._seq)

    def add(self, s: C) -> None:
        if id(s) in self._seq:
            self.refresh(s)
            return
        self._seq[id(s)] = next(self._counter)
        self._slots[id(s)] = 0
        self.all.add(s)
        self.refresh(s)

    def remove(self, s: C) -> None:
        if self._seq.pop(id(s), None) is None:
            return
        self.free_slots -= self._slots.pop(id(s))
        self.all.discard(s)
        self.free.discard(s)

    def refresh(self, s: C) -> None:
        old = self._slots.get(id(s))
        if old is None:
            return  # not (or no longer) indexed
        # clamped per worker: one overloaded worker takes no slots from the others
        new = 0 if s.draining else max(0, s.max_concurrency - s.load)
        if new == old:
            return
        self._slots[id(s)] = new
        self.free_slots += new - old
        if old == 0:
            self.free.add(s)
        elif new == 0:
            self.free.discard(s)

    def order(self, s: C) -> int:
        """Registration order, the order of a scan of all sessions (unindexed: last)."""
        return self._seq.get(id(s), 1 << 62)

    def able(self, spec: JobSpec) -> int:
        """How many sessions could ever run spec (matching.can_ever_run), free or not."""
        pool = self.all.for_spec(spec)
        if pool is None:
            return 0
        if spec.needs_llm and spec.job_type is not JobType.LLM:  # model and task: check
            return sum(1 for s in pool if can_ever_run(spec, s))
        return len(pool)  # exactly the workers listing the task, or serving the model

    def free_task_names(self) -> frozenset[str]:
        return frozenset(self.free.by_task)

    def any_free_llm(self) -> bool:
        return bool(self.free.llm)
