"""``docsrag api --answer``: the API answers its own queue, for the embedded tier.

Milvus Lite serves one process per file, so on a laptop the API (which searches the index) and
a separate worker cannot both open it. With ``--answer`` the API process runs the answer flow's
drain itself (``Service.drain``, the same code a worker runs): woken at once by a submit, and
every ``idle_s`` otherwise (questions failed earlier come due, another writer's rows). On a
cluster, leave it off: the GPU work pool answers, started by the question's event.
"""

from __future__ import annotations

import logging
import threading

from docsrag.tasks.service.service import Service

log = logging.getLogger(__name__)

OUTAGE_PAUSE_S = 30.0  # a model server or index that is down is not asked again at once


class AnswerHere:
    def __init__(self, service: Service, idle_s: float = 2.0, max_seconds: float = 300.0):
        self.service, self.idle_s, self.max_seconds = service, idle_s, max_seconds
        self.woken, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="answer-here", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        self.woken.set()

    def stop(self) -> None:
        self.stopping.set()
        self.woken.set()
        self.thread.join(timeout=self.max_seconds)

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.woken.wait(self.idle_s)
            self.woken.clear()
            if self.stopping.is_set() or not self._waiting():
                continue
            try:
                summary = self.service.drain(self.max_seconds, owner="api")
                log.info("answered here: %s", summary.to_dict())
            except Exception as exc:  # noqa: BLE001 - the drain put its questions back and said why
                log.error("answering here stopped: %s; next try in %.0f s", exc, OUTAGE_PAUSE_S)
                self.stopping.wait(OUTAGE_PAUSE_S)

    def _waiting(self) -> bool:
        counts = self.service.queue.counts()
        return counts["pending"] + counts["failed"] > 0
