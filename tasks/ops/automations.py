"""The automations docsrag ships (infra/prefect/automations.yaml), applied to a Prefect server.

The notification block is the user's: a webhook URL from the environment becomes a
``CustomWebhookNotificationBlock`` whose URL is kept among the block's secrets (hidden in the
UI), or an existing block is named. Applying twice replaces the automations of the same name.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import yaml
from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.exceptions import ObjectNotFound

from docsrag.tasks.core.errors import DocsragError
from docsrag.tasks.core.settings import Settings

AUTOMATIONS_FILE = Path(__file__).resolve().parents[2] / "infra" / "prefect" / "automations.yaml"
WEBHOOK_BLOCK = "docsrag-notify"


class NotificationsNotConfigured(DocsragError, RuntimeError):
    """Neither a webhook nor a block to notify was given."""


def notification_block(settings: Settings) -> UUID:
    if settings.notify_block:
        slug, _, name = settings.notify_block.partition("/")
        try:
            return Block.load(f"{slug}/{name}")._block_document_id
        except ValueError as exc:
            raise NotificationsNotConfigured(f"DOCSRAG_NOTIFY_BLOCK: no block {settings.notify_block!r}: {exc}") \
                from None
    if settings.notify_webhook_url is None:
        raise NotificationsNotConfigured(
            "set DOCSRAG_NOTIFY_WEBHOOK_URL (a webhook taking {\"text\": ...}) or DOCSRAG_NOTIFY_BLOCK "
            "(<block-type-slug>/<name> of a notification block) to be told when runs fail")
    block = CustomWebhookNotificationBlock(
        name=WEBHOOK_BLOCK, url="{{ webhook_url }}", json_data={"text": "{{subject}}\n{{body}}"},
        secrets={"webhook_url": settings.notify_webhook_url.get_secret_value()})
    block.save(WEBHOOK_BLOCK, overwrite=True)
    return block._block_document_id


def apply_automations(block_id: UUID, path: Path = AUTOMATIONS_FILE) -> list[str]:
    """Create (or replace) each automation of the file, notifying through ``block_id``. -> names."""
    names = []
    for spec in yaml.safe_load(path.read_text())["automations"]:
        for action in spec["actions"]:
            if action["type"] == "send-notification":
                action["block_document_id"] = str(block_id)
        try:
            Automation.read(name=spec["name"]).delete()
        except (ValueError, ObjectNotFound):
            pass  # not there yet
        Automation.model_validate(spec).create()
        names.append(spec["name"])
    return names
