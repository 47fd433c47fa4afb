"""A failing rank stops the whole run quickly, with its own error, and never hangs."""
import time

import pytest

from runtime.launch import Job, RankFailed, one_line_error, spawn_local
from tests.distributed.plans import make_plan

pytestmark = pytest.mark.distributed


def test_one_failing_rank_fails_the_run_with_its_error(tmp_path):
    job = Job(plans=[make_plan(pp=2, nmb=2, schedule="1f1b").model_dump_json()], steps=2, fail_rank=1,
              pg_timeout_s=60)
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        spawn_local(job, 2, log_dir=tmp_path, timeout_s=120)
    elapsed = time.monotonic() - start
    assert info.value.rank == 1
    assert "injected failure on rank 1" in info.value.message
    assert "\n" not in info.value.message
    assert "Traceback" in (tmp_path / "rank1.log").read_text()
    assert elapsed < 60  # bounded: the survivor, blocked in a collective, is killed, not waited for


def test_one_line_error_reaches_the_root_cause():
    try:
        try:
            raise RuntimeError("reducer.cpp assert")
        except RuntimeError as inner:
            raise RuntimeError("\n   [Stage 0] failed to run forward:\n args ...") from inner
    except RuntimeError as outer:
        line = one_line_error(outer)
    assert line == "RuntimeError: [Stage 0] failed to run forward: <- RuntimeError: reducer.cpp assert"
