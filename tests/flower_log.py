"""What Flower's logger (a site's or the server's log) receives during a test.

Flower's logger does not propagate to the root logger, so pytest's caplog misses it.
"""
from __future__ import annotations

import logging


class FlowerLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def text(self) -> str:
        return "\n".join(self.format(r) for r in self.records)
