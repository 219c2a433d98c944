"""`nn.transfer.to_device` (uploads without host waits, the values of a plain `.to`) and `count_host_waits`."""

import threading
import traceback
from pathlib import Path

import pytest
import torch

from matrixgame_env.host_waits import count_host_waits, is_host_wait, wait_site
from matrixgame_env.nn.transfer import async_uploads, set_async_uploads, to_device


def test_to_device_on_the_host_is_a_plain_to():
    x = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    same = to_device(x, "cpu")
    assert same is x  # nothing to copy
    as_float = to_device(x, None, torch.float32)
    assert as_float.dtype == torch.float32 and torch.equal(as_float, x.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_uploads_through_pinned_memory_with_the_same_values():
    x = torch.randn(4, 5, dtype=torch.float64)
    for dtype in (None, torch.float32, torch.bfloat16):
        uploaded = to_device(x, "cuda", dtype)
        expected = x.to("cuda", dtype=dtype)
        assert uploaded.is_cuda and uploaded.dtype == expected.dtype and torch.equal(uploaded, expected)
    view = x[:, 1:3]  # a non-contiguous source is staged as it is read
    assert torch.equal(to_device(view, torch.device("cuda")).cpu(), view)
    held = x[:, None, :].expand(4, 3, 5)  # actions held over a block: one row read three times
    assert torch.equal(to_device(held, "cuda", torch.float32).cpu(), held.float())
    assert not x.is_pinned()  # the caller's tensor is left as it was


def test_count_host_waits_runs_the_work_and_finds_none_without_cuda():
    calls = []
    waits = count_host_waits(lambda: calls.append(1))
    assert calls == [1]
    if not torch.cuda.is_available():
        assert waits == {}


def test_only_torchs_wait_reports_count_not_its_notice_that_the_debug_mode_is_a_prototype():
    assert is_host_wait(UserWarning("called a synchronizing CUDA operation (Triggered internally at ...)"))
    notice = "Synchronization debug mode is a prototype feature and does not yet detect all synchronizing operations"
    assert not is_host_wait(UserWarning(notice))


def test_a_wait_is_keyed_by_the_innermost_package_frame_else_by_the_callers_own(tmp_path):
    package, elsewhere = tmp_path / "pkg", tmp_path / "tests"

    def stack(*frames):
        return traceback.StackSummary.from_list([(str(path), line, name, "") for path, line, name in frames])

    caller = (elsewhere / "test_x.py", 12, "step")
    inner = (package / "vector.py", 293, "_wait_for")
    torch_frame = (tmp_path / "torch" / "cuda" / "streams.py", 80, "synchronize")
    assert wait_site(stack(caller, inner, torch_frame), package) == "vector.py:293:_wait_for"
    # No package frame: the innermost frame but the warnings machinery's names where the wait came from.
    warnings_frame = (tmp_path / "lib" / "warnings.py", 100, "_showwarnmsg")
    assert wait_site(stack(caller, torch_frame, warnings_frame), package) == "outside streams.py:80:synchronize"
    assert wait_site(stack(caller), package) == "outside test_x.py:12:step"
    keys = []
    worker = threading.Thread(target=lambda: keys.append(wait_site(stack(caller, inner), package)), name="uploader")
    worker.start()
    worker.join()
    assert keys == ["vector.py:293:_wait_for (thread uploader)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_count_host_waits_names_the_line_that_waited():
    def work():
        total = torch.ones(3, device="cuda").sum()
        return float(total)  # reads the GPU's result: the host waits

    waits = count_host_waits(work, within=Path(__file__).resolve().parent)
    assert waits.total() == 1 and next(iter(waits)).endswith(":work"), waits
    assert count_host_waits(lambda: to_device(torch.ones(3), "cuda"), within=Path(__file__).resolve().parent) == {}


def test_async_uploads_can_be_switched_off_and_on():
    assert async_uploads()
    try:
        set_async_uploads(False)
        assert not async_uploads()
        x = torch.arange(4)
        target = "cuda" if torch.cuda.is_available() else "cpu"
        assert torch.equal(to_device(x, target).cpu(), x)  # a plain `.to`: the same values
    finally:
        set_async_uploads(True)
    assert async_uploads()
