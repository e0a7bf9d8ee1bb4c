"""Reading a run's metrics.jsonl (MetricsJsonl in app/training/callbacks.py writes it). Standard library
only: the web UI watches a live run with it without importing torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (MetricsJsonl writes them), in order; [] when there is no
    file. A line a kill cut short is left out: it is logged again when the run resumes."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # blank, or cut short
    return rows
