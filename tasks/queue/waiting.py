"""Long-polls that do not poll once per waiter: one watcher per process asks the database, every
``interval_s``, which of all the questions being waited on are final, in one query, and wakes
their waiters. A thousand clients waiting cost one small query per interval, not a thousand."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.engine import Engine

from docsrag.tasks.queue.schema import questions

FINAL = ("answered", "dead")


class AnswerWatch:
    def __init__(self, engine: Engine, interval_s: float = 0.25):
        self.engine = engine
        self.interval_s = interval_s
        self.waiters: dict[int, list[asyncio.Event]] = defaultdict(list)
        self.watcher: asyncio.Task | None = None

    async def wait(self, question_id: int, timeout_s: float) -> bool:
        """Until the question is answered or dead (True) or ``timeout_s`` passed (False)."""
        done = asyncio.Event()
        self.waiters[question_id].append(done)
        if self.watcher is None or self.watcher.done():
            self.watcher = asyncio.create_task(self._watch())
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            events = self.waiters.get(question_id, [])
            if done in events:
                events.remove(done)
            if not events:
                self.waiters.pop(question_id, None)

    async def _watch(self) -> None:
        while self.waiters:
            ids = list(self.waiters)
            final = await asyncio.to_thread(self._final, ids)
            for question_id in final:
                for done in self.waiters.get(question_id, []):
                    done.set()
            await asyncio.sleep(self.interval_s)

    def _final(self, ids: list[int]) -> set[int]:
        with self.engine.begin() as db:
            return set(db.scalars(select(questions.c.id).where(questions.c.id.in_(ids)
                                                               & questions.c.status.in_(FINAL))))
