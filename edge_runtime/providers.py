"""Execution providers: the CPU, and Qualcomm's QNN (HTP backend) through the onnxruntime-qnn plugin library.

onnxruntime-qnn 2.x is a plugin EP: its library is registered with ONNX Runtime once per process, which then lists
the devices it can drive (`onnxruntime.get_ep_devices()`); a session adds the EP for those devices with provider
options. The HTP backend is a second library (`libQnnHtp.so` / `QnnHtp.dll`) named by the `backend_path` option;
on x86_64 Linux it is Qualcomm's simulator of the NPU.

CPU fallback is disabled on QNN sessions (`session.disable_cpu_ep_fallback=1`): a graph node the NPU cannot take
is a load error, never a silent slow path. Graph input quantization stays on the NPU too
(`offload_graph_io_quantization=0`), since offloading it would hand those nodes to the CPU.
"""
from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from .errors import ExecutionProviderError, InvalidArgumentError

EPS = ("cpu", "qnn")
QNN_EP = "QNNExecutionProvider"
# our defaults; any of them can be overridden with --ep-option KEY=VALUE
# Float operators (the quantized graphs keep norms, adds, rotary and the attention core float) run in float16 on
# HTP; ONNX Runtime asks for the SoC with it. 60 is the Snapdragon X Elite laptop chip (SC8380XP, HTP v73); pass
# --ep-option soc_model=... (or `compile --soc`) for another (57: 8 Gen 3, 69: 8 Elite).
QNN_DEFAULTS = {"offload_graph_io_quantization": "0", "enable_htp_fp16_precision": "1", "soc_model": "60"}
# ahead-of-time compilation can afford the slowest, best HTP graph optimization
QNN_COMPILE_DEFAULTS = {"htp_graph_finalization_optimization_mode": "3"}

_registered: str | None = None  # the QNN library path registered in this process


@dataclass(frozen=True)
class QnnStatus:
    available: bool
    reason: str                  # why not, when not available
    version: str | None = None   # onnxruntime-qnn package version
    qnn_sdk: str | None = None   # the QNN SDK it was built with
    library: str | None = None
    htp_backend: str | None = None
    devices: tuple[str, ...] = ()


def parse_ep_options(pairs: Iterable[str]) -> dict[str, str]:
    """`["htp_performance_mode=burst", ...]` -> a dict; a pair without '=' is an InvalidArgumentError."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidArgumentError(f"execution provider option {pair!r} is not KEY=VALUE "
                                       "(e.g. --ep-option htp_performance_mode=burst)")
        options[key.strip()] = value.strip()
    return options


def check_ep(ep: str) -> str:
    if ep not in EPS:
        raise InvalidArgumentError(f"unknown execution provider {ep!r}; choose one of {', '.join(EPS)}")
    return ep


def _qnn_package():
    try:
        import onnxruntime_qnn
    except ImportError:
        raise ExecutionProviderError("the QNN execution provider is not installed: "
                                     "pip install 'edge-runtime[qnn]' (onnxruntime-qnn)") from None
    return onnxruntime_qnn


def htp_backend_path() -> Path:
    return Path(_qnn_package().get_qnn_htp_path())


def register_qnn() -> list:
    """Register onnxruntime-qnn's plugin library (once per process); return its OrtEpDevices."""
    global _registered
    pkg = _qnn_package()
    library = pkg.get_library_path()
    if _registered is None and not _qnn_devices():
        if not Path(library).is_file():
            raise ExecutionProviderError(f"onnxruntime-qnn is installed but its library {library} is missing; "
                                         "reinstall onnxruntime-qnn")
        ort.set_default_logger_severity(3)  # the EP's start-up warnings are not the user's business
        try:
            ort.register_execution_provider_library(QNN_EP, library)
        except Exception as e:  # ORT raises its own Fail type; the message says what went wrong
            raise ExecutionProviderError(f"ONNX Runtime cannot register the QNN library {library}: "
                                         f"{str(e).strip().splitlines()[0]}") from None
        _registered = library
    devices = _qnn_devices()
    if not devices:
        raise ExecutionProviderError("the QNN execution provider is registered but reports no device")
    return devices


def _qnn_devices() -> list:
    return [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP]


def qnn_status() -> QnnStatus:
    """Whether QNN with its HTP backend can be used here, and what it sees. Never raises."""
    try:
        pkg = _qnn_package()
        devices = register_qnn()
    except ExecutionProviderError as e:
        return QnnStatus(False, str(e))
    info = getattr(pkg, "build_and_package_info", None)
    htp = htp_backend_path()
    host = platform.machine().lower() in ("x86_64", "amd64")
    names = tuple(f"{d.ep_vendor} HTP on {d.device.type.name.lower()} {d.device.vendor or ''} (vendor id "
                  f"{d.device.vendor_id:#x})" + (" = the HTP simulator on this x86_64 host" if host else "")
                  for d in devices)
    status = QnnStatus(htp.is_file(), "" if htp.is_file() else f"the HTP backend {htp} is missing",
                       version=getattr(pkg, "__version__", None), qnn_sdk=getattr(info, "qnn_version", None),
                       library=pkg.get_library_path(), htp_backend=str(htp), devices=names)
    return status


def qnn_provider_options(ep_options: Mapping[str, str] | None = None) -> dict[str, str]:
    options = {"backend_path": str(htp_backend_path()), **QNN_DEFAULTS}
    options.update(ep_options or {})
    if "backend_type" in options:  # backend_type and backend_path are mutually exclusive
        options.pop("backend_path")
    return options


def add_ep(so: ort.SessionOptions, ep: str, ep_options: Mapping[str, str] | None = None) -> None:
    """Configure session options for `ep` ("cpu" needs nothing; "qnn": the plugin EP with CPU fallback off)."""
    check_ep(ep)
    if ep == "cpu":
        if ep_options:
            raise InvalidArgumentError(f"--ep-option {', '.join(ep_options)} given, but the CPU provider takes no "
                                       "options; they are for --ep qnn")
        return
    devices = register_qnn()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    so.add_provider_for_devices(devices, qnn_provider_options(ep_options))


@contextlib.contextmanager
def _native_stdout_to_stderr(active: bool):
    """The HTP library prints a banner on stdout when it loads; stdout carries the model's answer, so send
    native writes made meanwhile to stderr."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def create_ep_session(path: Path, ep: str = "cpu", ep_options: Mapping[str, str] | None = None,
                      threads: int | None = None, config: Mapping[str, str] | None = None) -> ort.InferenceSession:
    """A session for one graph on `ep`; load failures become BundleError (CPU) or ExecutionProviderError (QNN)."""
    from .errors import BundleError
    from .session import session_options
    so = session_options(threads)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    add_ep(so, ep, ep_options)
    try:
        with _native_stdout_to_stderr(ep != "cpu"):
            return ort.InferenceSession(str(path), sess_options=so)
    except Exception as e:  # ORT raises its own Fail/EPFail/InvalidProtobuf types
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if ep == "cpu":
            raise BundleError(f"ONNX Runtime cannot load {path}: {first_line}; re-export the bundle") from None
        raise ExecutionProviderError(f"the {ep.upper()} execution provider cannot load {path}: {first_line}") from None
