"""What every benchmark does before it imports the project: the repository on sys.path, the CLI's offline
environment (nothing phones home), and no progress bars in the timed output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # gitignored
sys.path.insert(0, str(ROOT))
os.environ.setdefault("LLMOPS_PROGRESS", "0")

from llmops.common.env import OFFLINE as OFFLINE_ENV  # noqa: E402  (importing the CLI sets these too)

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
