"""One way for every benchmark to write its results: command, machine, fields, time."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def write_record(out: Path, script: str, *, machine: dict[str, Any] | None = None, **fields: Any) -> None:
    record = {
        "command": " ".join(["python", script, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    **(machine or {})},
        **fields,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {out}")
