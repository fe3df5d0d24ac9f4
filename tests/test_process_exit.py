"""How an `ngdiff` process ends: a rank of a distributed run skips interpreter finalization (whose C++
teardown of gloo/DeepSpeed objects aborts now and then after a successful run); a one-process run does not."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from parallel.distributed import leave

SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys
    import parallel.distributed as d
    logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    atexit.register(lambda: print("finalized", flush=True))
    d._joined_group = {joined}
    print("unflushed line", end="")  # stdout is a pipe: block-buffered until flushed
    logging.getLogger("ngdiff").info("logged line")
    raise SystemExit(d.leave(3))
    """
)


def run_script(joined: bool) -> subprocess.CompletedProcess:
    code = SCRIPT.format(joined=joined)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_distributed_rank_leaves_with_its_code_without_finalization_and_loses_no_output():
    proc = run_script(joined=True)
    assert proc.returncode == 3
    assert proc.stdout == "unflushed line"  # flushed before leaving; the atexit handler never ran
    assert "logged line" in proc.stderr


def test_a_one_process_run_returns_its_code_and_finalizes_normally():
    assert leave(5) == 5  # this test process joined no group: it must not be ended
    proc = run_script(joined=False)
    assert proc.returncode == 3
    assert proc.stdout == "unflushed linefinalized\n"
