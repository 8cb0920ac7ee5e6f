"""The waiting queue: one FIFO per tenant, served round-robin, so no tenant waits behind another's backlog.

A tenant with 64 requests waiting and a tenant with one: the one request is admitted after at most one of
the 64 (and one of every other tenant's waiting ahead of it), not after all of them. Rows pushed out of a
full KV pool (preempted) come back before anything else: they were running already.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

from prefixserve.engine.sequence import Sequence


class FairQueue:
    def __init__(self) -> None:
        self._resumed: deque[Sequence] = deque()  # preempted rows, to be recomputed first
        self._tenants: OrderedDict[str, deque[Sequence]] = OrderedDict()  # in turn order
        self._size = 0

    def append(self, seq: Sequence) -> None:
        self._tenants.setdefault(seq.tenant, deque()).append(seq)
        self._size += 1

    def push_front(self, seq: Sequence) -> None:
        """A preempted row: it goes ahead of every tenant's waiting requests."""
        self._resumed.appendleft(seq)
        self._size += 1

    def peek(self) -> Sequence | None:
        if self._resumed:
            return self._resumed[0]
        for queue in self._tenants.values():
            return queue[0]
        return None

    def heads(self) -> Iterator[Sequence]:
        """The requests that may go next: preempted rows, then each tenant's oldest, in turn order."""
        yield from self._resumed
        for queue in self._tenants.values():
            yield queue[0]

    def pop(self, seq: Sequence) -> None:
        """Take out `seq`, one of `heads()`; a tenant's turn then passes to the next tenant."""
        if self._resumed and self._resumed[0] is seq:
            self._resumed.popleft()
        elif seq in self._resumed:
            self._resumed.remove(seq)
        else:
            queue = self._tenants.pop(seq.tenant)
            assert queue[0] is seq, "only a tenant's oldest request can be taken"
            queue.popleft()
            if queue:
                self._tenants[seq.tenant] = queue  # to the back of the turn order
        self._size -= 1

    def remove_if(self, predicate: Callable[[Sequence], bool]) -> list[Sequence]:
        removed = [s for s in self if predicate(s)]
        if removed:
            self._resumed = deque(s for s in self._resumed if not predicate(s))
            for tenant in list(self._tenants):
                kept = deque(s for s in self._tenants[tenant] if not predicate(s))
                if kept:
                    self._tenants[tenant] = kept
                else:
                    del self._tenants[tenant]
            self._size -= len(removed)
        return removed

    def clear(self) -> None:
        self._resumed.clear()
        self._tenants.clear()
        self._size = 0

    def __iter__(self) -> Iterator[Sequence]:
        yield from self._resumed
        for queue in self._tenants.values():
            yield from queue

    def __len__(self) -> int:
        return self._size
