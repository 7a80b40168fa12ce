"""A Grid that collects replies every half second instead of every three.

Flower's deployment Grid (`flwr.superlink.grid.http_grid`) sleeps 3 s between pulls in
`send_and_receive`, and a round has two of them (train, evaluate): on small models that is a
visible share of a round. `PollingGrid` wraps any Grid and pulls on a shorter interval;
everything else is delegated. Pulls are cheap (message ids only until replies are there).
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.5


class PollingGrid(Grid):
    """Delegates to `grid`; `send_and_receive` polls every `interval` seconds."""

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL_S):
        self.grid, self.interval = grid, interval

    def set_run(self, run):  # noqa: ANN001 - Flower's Run
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every message has a reply or `timeout` seconds passed."""
        pending = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            time.sleep(self.interval)
        return replies
