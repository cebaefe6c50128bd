"""Watch the docs repository's releases; announce each new one, or ingest it directly.

On a Prefect server, each new release becomes a ``docsrag.release.published`` event and the
``ingest-docs`` deployment's trigger runs the ingest with the asset URL. On the embedded
defaults (no server, no automations), ``ingest=True`` runs the ingest flow here instead.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.events import emit_event

from docsrag.flows.ingest import ingest_release
from docsrag.tasks.core.objectstore import open_store
from docsrag.tasks.core.settings import Settings, settings_for_run
from docsrag.tasks.core.summaries import RefusedAsset, WatchSummary
from docsrag.tasks.ingest.feed import MalformedFeed, PublishedAsset, RateLimited, SeenReleases, read_feed
from docsrag.tasks.ingest.release import version_order
from docsrag.tasks.ingest.report import name_run

EVENT = "docsrag.release.published"


def _worth_retrying(task, task_run, state) -> bool:
    # A rate limit's message says when to come back; a malformed answer is the same a minute later.
    return not isinstance(state.result(raise_on_failure=False), (RateLimited, MalformedFeed))


@task(name="read-feed", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_worth_retrying,
      cache_policy=NONE, persist_result=False)
def fetch_feed(settings: Settings, etag: str | None) -> tuple[list[PublishedAsset] | None, str | None]:
    token = settings.github_token.get_secret_value() if settings.github_token else None
    return read_feed(settings.releases_api, settings.release_asset_pattern, etag=etag, token=token,
                     timeout_s=settings.download_timeout_s, trusted=settings.trusted_release_hosts)


def announce(asset: PublishedAsset) -> None:
    emit_event(event=EVENT,
               resource={"prefect.resource.id": f"docsrag.release.{asset.version}",
                         "prefect.resource.name": asset.name},
               payload={"version": asset.version, "asset_url": asset.url, "asset_id": asset.asset_id,
                        "size": asset.size, "tag": asset.tag})


@flow(name="watch-releases")
def watch_releases(ingest: bool = False) -> WatchSummary:
    """Find new release assets; emit an event for each (or ingest them when ``ingest``)."""
    settings = settings_for_run()
    seen = SeenReleases(open_store(settings.object_store, settings.s3_endpoint_url), settings.release_repo)
    assets, etag = fetch_feed(settings, seen.etag)
    refused = [a for a in assets or [] if a.refused]
    for asset in refused:
        get_run_logger().warning("refused release asset %s (%s): %s", asset.name[:200], asset.tag, asset.refused)
    new = sorted((a for a in assets or [] if seen.is_new(a) and not a.refused), key=lambda a: version_order(a.version))
    failed = []
    for asset in new:  # oldest first, so the main alias ends on the newest version
        try:
            if ingest:
                ingest_release(release=asset.url, version=asset.version)
            else:
                announce(asset)
            seen.mark(asset)
        except Exception as exc:
            failed.append(f"{asset.version}: {exc}")
    # Keep the ETag only when everything new was handled, so a failed release is seen again.
    seen.save(etag if not failed else None)
    if failed:
        raise RuntimeError("could not ingest " + "; ".join(failed))
    events = 0 if ingest else len(new)
    get_run_logger().info("%d release asset(s) in the feed, %d new: %s; %d ingested, %d events emitted, %d refused",
                          len(assets or []), len(new), ", ".join(a.version for a in new) or "none",
                          len(new) if ingest else 0, events, len(refused))
    name_run(f"watch: {len(new)} new release{'' if len(new) == 1 else 's'}")
    return WatchSummary([a.version for a in new], len(seen.seen), events,
                        [RefusedAsset(a.name, a.tag, a.refused) for a in refused])
