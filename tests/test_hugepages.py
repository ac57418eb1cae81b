"""huge_pages_for_what_loads: the anonymous memory allocated inside the block ends up on 2 MiB pages."""
from __future__ import annotations

import ctypes
import mmap
import os
import platform
import subprocess
import sys

import pytest

from edge_runtime.hugepages import HUGE, huge_pages_for_what_loads


def _thp_collapse_available() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            enabled = "[never]" not in f.read()
    except OSError:
        return False
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    return enabled and (major, minor) >= (6, 1)  # MADV_COLLAPSE


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping that holds address."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not _thp_collapse_available(), reason="needs Linux >= 6.1 with transparent huge pages")
@pytest.mark.parametrize("background", [False, True])
def test_memory_allocated_inside_the_block_is_collapsed(background):
    with huge_pages_for_what_loads(background=background) as hp:
        # a fresh private anonymous mapping (what malloc makes of a large block while it has no free one to reuse)
        buf = mmap.mmap(-1, 24 << 20, flags=mmap.MAP_PRIVATE)
        buf[:] = os.urandom(1024) * (24 << 10)
    hp.wait()
    middle = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)) + len(buf) // 2
    assert hp.collapsed >= 8 * HUGE
    # madvise split the mapping at 2 MiB boundaries: the aligned middle part is the one on huge pages
    assert _huge_bytes_at(middle) >= 8 * HUGE
    assert buf[:1024] == buf[1024:2048]  # the contents moved with the pages


def test_an_exception_inside_the_block_is_not_swallowed():
    with pytest.raises(ValueError):
        with huge_pages_for_what_loads():
            raise ValueError("load failed")


# In a process of its own: after an earlier test freed a big buffer, glibc serves the next one from memory it
# already holds, which a block does not count as loaded by it.
SESSION_CHILD = """
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from edge_runtime.hugepages import HUGE, huge_pages_for_what_loads
from edge_runtime.session import create_session
w = np.random.default_rng(0).standard_normal((1024, 4096), dtype=np.float32)
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])],
                          [numpy_helper.from_array(w, "w")])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
with huge_pages_for_what_loads() as hp:
    session = create_session(sys.argv[1], threads=1)
x = np.random.default_rng(1).standard_normal((1, 1024), dtype=np.float32)
np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ w, rtol=1e-4, atol=1e-3)
print(hp.collapsed // HUGE)
"""


@pytest.mark.skipif(not _thp_collapse_available(), reason="needs Linux >= 6.1 with transparent huge pages")
def test_a_session_loaded_inside_the_block_runs_on_huge_pages(tmp_path):
    """ONNX Runtime prepacks a MatMul's 16 MiB weight into its own heap memory: that is what gets collapsed, and
    the session computes the same product afterwards."""
    done = subprocess.run([sys.executable, "-c", SESSION_CHILD, str(tmp_path / "mm.onnx")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 4  # huge pages rebuilt: the 16 MiB prepacked weight holds 7
