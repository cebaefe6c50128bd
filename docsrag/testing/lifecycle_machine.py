"""The index lifecycle as a state machine over a real Milvus (Lite file or server), checked against
a reference model after every step.

Rules: ingest a release (a few small generated releases per version, some republished with
changes, one that drops most pages), roll back, a crash injected before any Milvus mutation of
an ingest or a rollback (create, upsert, delete, flush, set info, alias create/alter/drop, drop
collection), the next run's repair, and a second writer while the corpus is held. The model is a
few lists: what each version alias has published, the main alias's stack, and what garbage
collection may keep; the implementation keeps its state in collection properties and aliases.

Used by tests/unit/index/test_lifecycle_model.py (fixed seed, bounded) and bench/lifecycle.py (long runs).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from pymilvus import MilvusClient

from docsrag.tasks.index import build, publish, store, writer_lock
from docsrag.tasks.index import schema as index
from docsrag.tasks.index.build import GuardRailError
from docsrag.tasks.index.schema import Corpus
from docsrag.tasks.ingest.chunking import Chunk
from docsrag.tasks.ingest.release import Release, version_order

logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # query_iterator warns on every page against Milvus Lite
CORPUS = Corpus("lifecycle_docs")
KEEP = 2
DIM = 8
VERSIONS = ("2.4.x", "2.5.x", "2.10.x")  # 2.10.x is the newest: versions order as numbers
MUTATIONS = {"create_collection", "upsert", "delete", "flush", "alter_collection_properties", "create_alias",
             "alter_alias", "drop_alias", "drop_collection"}


@dataclass(frozen=True)
class GenRelease:
    """A generated release: ``rid`` names it in the model; its chunks decide its build."""

    rid: str
    version: str
    pages: dict[str, str]  # doc path -> text

    @property
    def chunks(self) -> list[Chunk]:
        found = []
        for path, text in sorted(self.pages.items()):
            for n, part in enumerate(text.split("|")):
                chunk_id = hashlib.sha256(f"{path}\n{part}".encode()).hexdigest()[:32]
                found.append(Chunk(chunk_id, path, path, f"{path} > {n}", part))
        return found

    @property
    def ids(self) -> frozenset[str]:
        return frozenset(c.id for c in self.chunks)

    @property
    def documents(self) -> set[str]:
        return set(self.pages)

    def release(self) -> Release:
        sha = hashlib.sha256(repr(sorted(self.pages.items())).encode()).hexdigest()
        return Release(f"gen://{self.rid}", self.version, Path("/nonexistent"), sha, 0, f"releases/{self.rid}", False)


def _releases() -> dict[str, GenRelease]:
    """Per version: a release, a republished one with one page changed, and one that keeps a page
    of five (the guard rail refuses it unless forced)."""
    found = {}
    for v in VERSIONS:
        pages = {f"{v}/page{n}.md": f"{v} page {n} part a|{v} page {n} part b" for n in range(5)}
        shared = {f"common/page{n}.md": f"common page {n} part a|common page {n} part b" for n in range(2)}
        found[f"{v}:a"] = GenRelease(f"{v}:a", v, {**pages, **shared})
        found[f"{v}:b"] = GenRelease(f"{v}:b", v, {**pages, **shared, f"{v}/page0.md": f"{v} page 0 changed|part c"})
        found[f"{v}:small"] = GenRelease(f"{v}:small", v, {f"{v}/page1.md": pages[f"{v}/page1.md"]})
    return found


RELEASES = _releases()


class Crash(Exception):
    """The process died just before this Milvus call (an in-process SIGKILL)."""


class CrashingClient:
    """A real MilvusClient that dies before its ``crash_at``-th mutation; after that every call fails,
    as a dead process makes none. A wrapper at the call site: a kill between two pymilvus calls
    cannot be placed more precisely from outside the process."""

    def __init__(self, client: MilvusClient, crash_at: int | None):
        self.client, self.crash_at, self.mutations, self.dead = client, crash_at, 0, False

    def __getattr__(self, name):
        method = getattr(self.client, name)
        if name not in MUTATIONS and not self.dead:
            return method

        def call(*args, **kwargs):
            if self.dead or self.mutations == self.crash_at:
                self.dead = True
                raise Crash(f"killed before {name} (mutation {self.mutations})")
            self.mutations += 1
            return method(*args, **kwargs)
        return call


@dataclass
class Model:
    """What the aliases must serve: each version's publishes (newest last) and the main alias's stack."""

    published: dict[str, list[str]] = field(default_factory=lambda: {v: [] for v in VERSIONS})
    main: list[str] = field(default_factory=list)

    def copy(self) -> Model:
        return Model({v: list(r) for v, r in self.published.items()}, list(self.main))

    def serves(self) -> dict[str, str]:
        """alias -> release id."""
        want = {CORPUS.version_alias(v): rids[-1] for v, rids in self.published.items() if rids}
        if self.main:
            want[CORPUS.alias] = self.main[-1]
        return want

    def kept(self) -> set[str]:
        """The releases whose builds are kept as candidates: every alias's chain."""
        return set(self.main).union(*self.published.values())

    def observed(self) -> tuple[dict[str, str], set[str]]:
        return self.serves(), self.kept()

    def moves_main(self, rel: GenRelease) -> bool:
        return not self.main or version_order(rel.version) >= version_order(RELEASES[self.main[-1]].version)

    def guard_refuses(self, rel: GenRelease) -> bool:
        """Only the aliases that move are judged: each keeps at least half of what it serves."""
        moving = [self.published[rel.version][-1:]]
        if self.moves_main(rel):
            moving.append(self.main[-1:])
        for served in (RELEASES[r].documents for rids in moving for r in rids):
            if len(served & rel.documents) * 2 < len(served):
                return True
        return False

    def publish(self, rel: GenRelease) -> None:
        versions = self.published[rel.version]
        if versions[-1:] == [rel.rid] and (not self.moves_main(rel) or self.main[-1:] == [rel.rid]):
            return  # served already: nothing changes
        move = self.moves_main(rel)
        self.published[rel.version] = [r for r in versions if r != rel.rid] + [rel.rid]
        if move:
            self.main = [r for r in self.main if r != rel.rid] + [rel.rid]
        self.collect_garbage()

    def rollback(self) -> str | None:
        """-> the release the main alias serves after it, None when refused."""
        if len(self.main) < 2:
            return None
        gone = self.main.pop()
        for v, rids in self.published.items():
            self.published[v] = [r for r in rids if r != gone]
        return self.main[-1]

    def collect_garbage(self) -> None:
        kept = set(self.main[-KEEP:]).union(*(rids[-KEEP:] for rids in self.published.values()))
        self.main = [r for r in self.main if r in kept]
        for v, rids in self.published.items():
            self.published[v] = [r for r in rids if r in kept]


class Lifecycle(RuleBasedStateMachine):
    """Subclassed with a ``client`` (a real MilvusClient, emptied before each sequence) and ``home``."""

    client: MilvusClient
    home: Path
    counts: dict[str, int]  # set per run: what the sequences did

    def __init__(self):
        super().__init__()
        self._empty()
        self.model = Model()
        self.pending: list[Model] | None = None  # after a crash: the model had it committed, or not
        self.crashed: str | None = None  # the release whose ingest crashed
        self._count("sequences")

    @classmethod
    def _count(cls, what: str) -> None:
        cls.counts[what] = cls.counts.get(what, 0) + 1

    def _empty(self) -> None:
        """Only the corpus's own aliases and builds: the Milvus server may serve others."""
        for alias in self._aliases():
            self.client.drop_alias(alias)
        for name in index.builds_of(self.client, CORPUS.alias):
            self.client.drop_collection(name)

    # -- the operations, as the flows run them ------------------------------------------------------

    def _ingest(self, client, rel: GenRelease, force: bool) -> str:
        chunks = rel.chunks
        plan = build.plan_build(client, CORPUS, rel.release(), chunks, {"dim": DIM}, "if-newer")
        build.check_guard_rails(plan, force)
        target = plan.serves
        if target is None:
            target = build.staging_collection(client, plan, rel.release(), "hash", DIM, None)
            rows = [index.row(c, {"dense": _vector(c.id)}, rel.version) for c in plan.diff.reusable()]
            rows += [index.row(c, {"dense": _vector(c.id)}, rel.version) for c in plan.diff.to_embed()]
            for part in build.batched(rows, 7):  # several writes: a crash can fall between them
                store.upsert(client, target, part)
            build.validate(client, target, plan.diff.new_ids)
        publish.publish(client, CORPUS, target, plan.main, KEEP)
        return target

    # -- rules ----------------------------------------------------------------------------------------

    @precondition(lambda self: self.pending is None)
    @rule(rid=st.sampled_from(sorted(RELEASES)), force=st.booleans(), contested=st.integers(0, 5))
    def ingest(self, rid: str, force: bool, contested: int) -> None:
        """``contested == 0``: a second writer tries the same first, while this one holds the corpus."""
        rel = RELEASES[rid]
        if contested == 0:
            self._second_writer(rel)
        refused = not force and self.model.guard_refuses(rel)
        try:
            self._ingest(self.client, rel, force)
        except GuardRailError:
            assert refused, f"the guard rail refused {rid}, the model would publish it"
            self._count("refused by the guard rail")
            return
        assert not refused, f"{rid} was published, the model's guard rail refuses it"
        self.model.publish(rel)
        self._count("ingests")

    @precondition(lambda self: self.pending is None)
    @rule(rid=st.sampled_from(sorted(RELEASES)), crash_at=st.integers(0, 11))
    def ingest_killed(self, rid: str, crash_at: int) -> None:
        rel = RELEASES[rid]
        if self.model.guard_refuses(rel):
            return
        try:
            self._ingest(CrashingClient(self.client, crash_at), rel, force=False)
        except Crash:
            committed = self.model.copy()
            committed.publish(rel)
            self.pending, self.crashed = [self.model, committed], rid
            self._count("crashes injected")
            return
        self.model.publish(rel)
        self._count("ingests")

    @precondition(lambda self: self.pending is None and self.model.main)
    @rule()
    def rollback(self) -> None:
        expected = self.model.copy()
        lands_on = expected.rollback()
        try:
            _, to = publish.rollback(self.client, CORPUS)
        except store.StoreError as exc:
            assert lands_on is None, f"rollback refused ({exc}); the model lands on {lands_on}"
            self._count("rollbacks refused")
            return
        assert lands_on is not None, f"rolled back to {to}; the model has nothing to roll back to"
        assert self._rid(to) == lands_on
        self.model = expected
        self._count("rollbacks")

    @precondition(lambda self: self.pending is None and len(self.model.main) > 1)
    @rule(crash_at=st.integers(0, 3))
    def rollback_killed(self, crash_at: int) -> None:
        rolled = self.model.copy()
        if rolled.rollback() is None:
            return
        try:
            publish.rollback(CrashingClient(self.client, crash_at), CORPUS)
        except Crash:
            self.pending, self.crashed = [self.model, rolled], None
            self._count("crashes injected")
            return
        self.model = rolled
        self._count("rollbacks")

    @precondition(lambda self: self.pending is not None)
    @rule(rid=st.sampled_from(sorted(RELEASES)), same=st.booleans())
    def next_run_repairs(self, rid: str, same: bool) -> None:
        """The next run after a crash (the same ingest again, or any release, forced) must end where
        the model says, whether or not the crashed step had committed."""
        rel = RELEASES[self.crashed if same and self.crashed else rid]
        self._ingest(self.client, rel, force=True)
        outcomes = [m.copy() for m in self.pending]
        for outcome in outcomes:
            outcome.publish(rel)
        seen = self._observed()
        matches = [m for m in outcomes if m.observed() == seen]
        assert matches, f"after the next run: {seen}, neither of {[m.observed() for m in outcomes]}"
        if len({repr(m) for m in outcomes}) > 1 and len(matches) == 1:
            self._count("crashes after the commit" if matches[0] is outcomes[1] else "crashes before the commit")
        self.model, self.pending = matches[-1], None
        self._count("repairs")

    def _second_writer(self, rel: GenRelease) -> None:
        before = self._served()
        with writer_lock.file_lock(self.home, CORPUS.collection):
            try:
                with writer_lock.file_lock(self.home, CORPUS.collection):
                    self._ingest(self.client, rel, force=True)
            except writer_lock.WriterBusy:
                self._count("second writers refused")
            else:
                raise AssertionError("a second writer got the corpus while the first held it")
        assert self._served() == before

    # -- invariants -------------------------------------------------------------------------------------

    def _rid(self, collection: str) -> str:
        sha = index.info_of(self.client, collection).release_sha256
        return next(r for r, rel in RELEASES.items() if rel.release().sha256 == sha)

    def _aliases(self) -> dict[str, str]:
        """The corpus's aliases (a Milvus server may serve other corpora beside it)."""
        return {alias: name for alias, name in store.aliases(self.client).items()
                if name.startswith(f"{CORPUS.alias}{index.BUILD_SEPARATOR}")}

    def _served(self) -> dict[str, str]:
        return {alias: self._rid(name) for alias, name in self._aliases().items()}

    def _observed(self) -> tuple[dict[str, str], set[str]]:
        """What each alias serves, and the releases kept as candidates (ready, not rolled back)."""
        return self._served(), {self._rid(b.name) for b in publish.builds(self.client, CORPUS) if b.info.candidate}

    @invariant()
    def every_alias_serves_a_ready_build_holding_exactly_its_release(self) -> None:
        for alias, name in self._aliases().items():
            info = index.info_of(self.client, name)
            assert info is not None and info.state == "ready", f"{alias} serves {name}, not ready: {info}"
            store.loaded(self.client, name)
            assert set(store.doc_of_ids(self.client, name)) == RELEASES[self._rid(name)].ids, f"{alias}: rows"

    @invariant()
    def the_aliases_serve_and_gc_keeps_what_the_model_says(self) -> None:
        if self.pending is None:
            assert self._observed() == self.model.observed()

    @invariant()
    def no_more_builds_are_kept_than_the_policy_allows(self) -> None:
        found = publish.builds(self.client, CORPUS)
        ready = [b for b in found if b.info.state == "ready"]
        unfinished = [b for b in found if b.info.state == "building"]
        chains = 1 + len(VERSIONS)
        # +1 each: a crash can fall after a publish and before its garbage collection.
        assert len(ready) <= KEEP * chains + 1, [b.name for b in ready]
        assert len(unfinished) <= KEEP + 1, [b.name for b in unfinished]


def _vector(chunk_id: str) -> list[float]:
    raw = hashlib.sha256(chunk_id.encode()).digest()[:DIM]
    return [b / 255 + 0.01 for b in raw]


BOUNDED = settings(max_examples=8, stateful_step_count=15, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))


def run_machine(client: MilvusClient, home, config: settings = BOUNDED) -> dict[str, int]:
    """Run the machine against a client (Milvus Lite or a server) in ``home``; -> what it counted."""
    machine = type("LifecycleOn", (Lifecycle,), {"client": client, "home": home, "counts": {}})
    run_state_machine_as_test(machine, settings=config)
    return machine.counts
