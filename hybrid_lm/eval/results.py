"""Resumable evaluation results: each finished cell (task, length, top-k) is one JSON line, appended and flushed
as soon as it is computed, so an interrupted evaluation loses at most the cell it was in. A cell's key holds every
setting its number depends on (the model's weights and the held-out text included), so a rerun with other settings
recomputes only what changed, and `results.json` is rebuilt from the cells each time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


class CellStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._cells: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # a line cut short by a crash: the cell is simply recomputed
                self._cells[cell_key(record["cell"])] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._trim_torn_tail()

    def _trim_torn_tail(self) -> None:
        """Rewrite the file without a line a crash left half-written, so appends start on a fresh line."""
        if self.path.is_file():
            text = self.path.read_text()
            if text and not text.endswith("\n"):
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self._cells.values()))

    def __contains__(self, cell: dict) -> bool:
        return cell_key(cell) in self._cells

    def get(self, cell: dict) -> dict | None:
        return self._cells.get(cell_key(cell))

    def add(self, cell: dict, result: dict) -> dict:
        record = {"cell": cell, **result}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._cells[cell_key(cell)] = record
        return record
