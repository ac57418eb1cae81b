"""`edge-rt compile BUNDLE --ep qnn`: ahead-of-time QNN context binaries (ONNX Runtime EPContext models).

Without them the QNN EP turns each static graph into an HTP graph and finalizes it at every start; with them a
session loads the prepared binary. For each static graph the EP writes `<variant>_ctx.onnx` (one EPContext node)
and `<variant>_ctx_qnn.bin` (the context binary, kept out of the .onnx: ep.context_embed_mode=0).

The bundle records them per graph (GraphSpec.ep_context) with their sha256 in `files`, so Bundle.load refuses a
binary that changed (a binary is handed to the NPU driver as is; a corrupt one can crash the process, not just fail).
Written atomically: a new folder, then the manifest replaced in one rename, then the old folder removed.
One binary per variant: the QNN simulator crashes loading a multi-graph (weight-sharing) context, so the variants
do not share one (ep.share_ep_contexts).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from .bundle import Bundle, sha256_file
from .errors import BundleError, InvalidArgumentError
from .manifest import MANIFEST, Manifest
from .providers import QNN_COMPILE_DEFAULTS, check_ep, create_ep_session, qnn_provider_options, qnn_status
from .static_decoder import static_specs

Progress = Callable[[str], None]
COMPILED_DIR_PREFIX = "compiled-"


def compiled_files(manifest: Manifest) -> set[str]:
    return {f for g in manifest.graphs if g.ep_context for f in (g.ep_context["file"], *g.ep_context["binaries"])}


def compile_bundle(path: str | Path, ep: str = "qnn", soc: str | None = None,
                   ep_options: Mapping[str, str] | None = None, progress: Progress | None = None) -> Bundle:
    """Compile every static graph of the bundle at `path` for `ep` (only "qnn" compiles); returns the bundle."""
    say = progress or (lambda _msg: None)
    if check_ep(ep) != "qnn":
        raise InvalidArgumentError(f"only --ep qnn has context binaries to compile, not {ep!r}")
    bundle = Bundle.load(path, verify=False)
    m = bundle.manifest
    for name in set(m.files) - compiled_files(m):  # old binaries are about to be replaced: check the rest
        if sha256_file(bundle.file(name)) != m.files[name]:
            raise BundleError(f"bundle file {bundle.file(name)} is corrupt (sha256 mismatch); re-export the bundle")
    roles = sorted({g.role for g in m.graphs if g.kind == "static"})
    specs = [s for role in roles for s in static_specs(m, role)]
    if not specs:
        raise BundleError(f"bundle {bundle.path} has no static graphs to compile; export it with "
                          "`edge-rt export ... --target-ep qnn`")
    options = {**QNN_COMPILE_DEFAULTS, **(ep_options or {})}
    if soc:
        options["soc_model"] = str(soc)
    status = qnn_status()
    folder = f"{COMPILED_DIR_PREFIX}{ep}-{uuid.uuid4().hex[:8]}"
    tmp, final = bundle.path / f".{folder}.tmp", bundle.path / folder
    tmp.mkdir()
    committed = False
    try:
        contexts = {}
        for spec in specs:
            stem = Path(spec.file).stem
            say(f"compile {spec.file}")
            t0 = time.perf_counter()
            before = set(os.listdir(tmp))
            session = create_ep_session(bundle.file(spec.file), ep, options, config={
                "ep.context_enable": "1", "ep.context_embed_mode": "0",
                "ep.context_file_path": str(tmp / f"{stem}_ctx.onnx")})
            del session
            made = sorted(set(os.listdir(tmp)) - before)
            if f"{stem}_ctx.onnx" not in made:
                raise BundleError(f"the QNN EP wrote no context model for {spec.file} (it wrote {made})")
            contexts[spec.file] = {
                "ep": ep, "file": f"{folder}/{stem}_ctx.onnx",
                "binaries": [f"{folder}/{name}" for name in made if name != f"{stem}_ctx.onnx"],
                "provider_options": {k: v for k, v in qnn_provider_options(options).items() if k != "backend_path"},
                "qnn_sdk": status.qnn_sdk, "onnxruntime_qnn": status.version,
                "compile_seconds": round(time.perf_counter() - t0, 2)}
        tmp.rename(final)
        files = {k: v for k, v in m.files.items() if k not in compiled_files(m)}
        for ctx in contexts.values():
            for name in (ctx["file"], *ctx["binaries"]):
                files[name] = sha256_file(bundle.path / name)
        graphs = tuple(replace(g, ep_context=contexts.get(g.file, g.ep_context if g.kind != "static" else None))
                       for g in m.graphs)
        old_dirs = {Path(f).parts[0] for f in compiled_files(m)}
        new = Manifest(**{**m.__dict__, "graphs": graphs, "files": files})
        staged = bundle.path / f".{MANIFEST}.tmp-{os.getpid()}"
        staged.write_text(json.dumps(new.to_dict(), indent=2) + "\n")
        os.replace(staged, bundle.path / MANIFEST)  # the commit point
        committed = True
        for old in old_dirs:
            shutil.rmtree(bundle.path / old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not committed:
            shutil.rmtree(final, ignore_errors=True)
    return Bundle.load(bundle.path)

