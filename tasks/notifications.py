"""The nightly distillation's notifications: two Prefect automations on the server of
PREFECT_API_URL, each sending a message through one notification block (Slack, Teams, email,
a webhook: any of Prefect's) —

- `lmforge: champion promoted`: the event `lmforge.champion.promoted` (tasks/champion.py);
- `lmforge: nightly run failed`: a flow run tagged `nightly` that failed or crashed.

    python -m tasks.notifications --block slack-webhook/ml-team   # a block made in the UI
    python -m tasks.notifications --webhook https://example.org/hook

`--webhook` saves a custom-webhook block `lmforge-nightly` that POSTs {"subject", "body"} as JSON.
Running it again replaces both automations (by name).
"""

from __future__ import annotations

import argparse
from uuid import UUID

from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

PROMOTED = "lmforge.champion.promoted"
WEBHOOK_BLOCK = "lmforge-nightly"
AUTOMATIONS = {
    "lmforge: champion promoted": (
        EventTrigger(expect={PROMOTED}, posture=Posture.Reactive, threshold=1),
        "lmforge: {{ event.resource['prefect.resource.id'] | replace('lmforge.model.', '') }} "
        "has a new champion",
        "Version {{ event.resource['lmforge.version'] }} promoted: {{ event.payload.reason }}. "
        "Shards: {{ event.payload.shards | join(', ') }}."),
    "lmforge: nightly run failed": (
        EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
                     match_related={"prefect.resource.id": "prefect.tag.nightly"},
                     posture=Posture.Reactive, threshold=1),
        "lmforge: nightly run {{ flow_run.name }} {{ flow_run.state.name | lower }}",
        "Flow run {{ flow_run.name }} of {{ flow.name }}: {{ flow_run.state.name }} "
        "({{ flow_run.state.message }})."),
}


def webhook_block(url: str) -> UUID:
    """A custom-webhook notification block for `url`, saved as `lmforge-nightly`."""
    block = CustomWebhookNotificationBlock(
        name=WEBHOOK_BLOCK, url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"})
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def create_automations(block_id: UUID) -> list[Automation]:
    """Both automations, sending through the block `block_id`; earlier ones of the same names
    are deleted first."""
    made = []
    for name, (trigger, subject, body) in AUTOMATIONS.items():
        try:
            Automation.read(name=name).delete()
        except ValueError:  # none of that name yet
            pass
        action = SendNotification(block_document_id=block_id, subject=subject, body=body)
        made.append(Automation(name=name, trigger=trigger, actions=[action]).create())
    return made


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.notifications", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--block", metavar="TYPE/NAME",
                        help="an existing notification block, e.g. slack-webhook/ml-team")
    target.add_argument("--webhook", metavar="URL", help="POST each message to URL as JSON")
    args = parser.parse_args(argv)
    if args.webhook:
        block_id = webhook_block(args.webhook)
    else:
        block_id = Block.load(args.block)._block_document_id
    for automation in create_automations(block_id):
        print(f"automation {automation.name!r} ({automation.id})")


if __name__ == "__main__":
    main()
