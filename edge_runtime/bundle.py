"""A bundle on disk: a folder with manifest.json, ONNX graphs, tokenizer. Checked before anything is allocated."""
from __future__ import annotations

import hashlib
import os
import shutil
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .manifest import MANIFEST, GraphSpec, Manifest


def publish(tmp: Path, out: Path) -> None:
    """Move a finished bundle folder into place: a rename, so readers see the old bundle or the new, never half."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Bundle:
        """Read and check a bundle: format version, every file present, every sha256 matching."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle folder {path} does not exist; export one with `edge-rt export`")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{path} has no {MANIFEST}; it is not a bundle (export one with `edge-rt export`)")
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{manifest_path} is not valid JSON ({e}); re-export the bundle") from None
        if not isinstance(data, dict):
            raise BundleError(f"{manifest_path} is not a JSON object; re-export the bundle")
        manifest = Manifest.from_dict(data)
        bundle = cls(path, manifest)
        bundle._check_files(verify)
        return bundle

    def _check_files(self, verify: bool) -> None:
        m = self.manifest
        needed = {m.tokenizer} | {g.file for g in m.graphs} | {f for g in m.graphs for f in g.data_files}
        unlisted = needed - set(m.files)
        if unlisted:
            raise BundleError(f"manifest lists no sha256 for {sorted(unlisted)}; re-export the bundle")
        if m.graph("target") is None:
            raise BundleError(f"bundle {self.path} has no target graph; re-export it")
        compiled = {f: g.ep_context["ep"] for g in m.graphs if g.ep_context
                    for f in (g.ep_context["file"], *g.ep_context.get("binaries", ()))}
        for name, digest in m.files.items():
            file = self.path / name
            # a compiled context binary (`edge-rt compile`) is remade by compiling again, not by exporting
            fix = (f"run `edge-rt compile {self.path} --ep {compiled[name]}` again" if name in compiled
                   else "re-export the bundle")
            if not file.is_file():
                raise BundleError(f"bundle file {file} is missing; {fix}")
            if verify and sha256_file(file) != digest:
                raise BundleError(f"bundle file {file} is corrupt (sha256 mismatch); {fix}")

    def file(self, name: str) -> Path:
        return self.path / name

    def graph(self, role: str) -> GraphSpec | None:
        return self.manifest.graph(role)
