"""The end-of-session check (conftest.py, leftovers.py) finds what the tests leave running.

- a child left running is found, and so is an orphan (its parent gone: adopted by the test process);
- multiprocessing's fork server and resource tracker are tolerated, a process the fork server forked
  (a rank) is not;
- a test that leaves a process fails the whole run, without xdist and from an xdist worker.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from leftovers import HELPERS, adopt_orphans, leftovers

pytest_plugins = ["pytester"]
TESTS = Path(__file__).parent
FORKSERVER_RANK = textwrap.dedent("""
    import multiprocessing, time
    rank = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(60,))
    rank.start()
    print(rank.pid, flush=True)
    time.sleep(60)
""")


def _killed(*pids: int) -> None:
    """Kill and reap these processes (those still there)."""
    procs = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=5)


def test_a_child_left_running_is_found():
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert child.pid in [p.pid for p in leftovers()]
    finally:
        child.kill()
        child.wait()
    assert child.pid not in [p.pid for p in leftovers()]


def test_an_orphan_is_found():
    if not adopt_orphans():
        pytest.skip("no child subreaper here (Linux only)")
    started = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    orphan = int(started.stdout)  # its parent (sh) has exited
    try:
        assert orphan in [p.pid for p in leftovers()]
    finally:
        _killed(orphan)


def test_the_fork_server_and_resource_tracker_are_tolerated_a_rank_is_not():
    launcher = subprocess.Popen([sys.executable, "-c", FORKSERVER_RANK], stdout=subprocess.PIPE, text=True)
    rank = int(launcher.stdout.readline())
    root = psutil.Process(launcher.pid)
    try:
        helpers = root.children()
        assert sorted(h for h in HELPERS for c in helpers if h in " ".join(c.cmdline())) == sorted(HELPERS)
        assert [p.pid for p in leftovers(root)] == [rank]
        assert {p.pid for p in leftovers(root, helpers=set())} == {rank, *(h.pid for h in helpers)}
    finally:
        descendants = root.children(recursive=True)
        launcher.kill()
        launcher.wait()
        _killed(*(p.pid for p in descendants))


@pytest.mark.parametrize("mode", [["-p", "no:xdist"], ["-n", "1"]], ids=["plain", "xdist"])
def test_a_process_left_running_fails_the_run(pytester, monkeypatch, mode):
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_leaves="""
        import subprocess

        def test_leaves_a_sleep():
            subprocess.Popen(["sleep", "61"])
    """)
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    started = time.monotonic()
    result = pytester.runpytest_subprocess(*mode, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*1 passed*"])
    result.stdout.fnmatch_lines(["*FAILED: 1 process(es) the tests started outlived them (now killed)*",
                                 "*pid *: sleep 61"])
    assert time.monotonic() - started < 60
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "61"]]
