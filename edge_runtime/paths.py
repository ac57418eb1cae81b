"""Where edge-runtime keeps fetched sources and built bundles: $EDGE_RT_HOME, default ~/.cache/edge-runtime."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("EDGE_RT_HOME") or Path.home() / ".cache" / "edge-runtime")


def sources_dir() -> Path:
    return home() / "sources"


def bundles_dir() -> Path:
    return home() / "bundles"
