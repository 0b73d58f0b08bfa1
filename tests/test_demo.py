"""``billing-worker demo`` as an operator runs it (``make run``): the console script, no
``BILLING_*`` set, so it starts its own redis-servers, worker and beat, and must stop them all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support.procs import log_tail, wait_until

#: About 25 s on a 2-core machine (a 3 s outage, then beat's replay every 5 s): below the ~30 s
#: bar for @pytest.mark.chaos, so it runs with ``make test``.


def processes_mentioning(marker: str) -> dict[int, str]:
    """Live processes whose command line or environment contains ``marker`` (zombies excluded)."""
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if state != "Z" and (marker in cmdline or marker in environ):
            found[int(proc.name)] = cmdline.strip()
    return found


def test_demo_exits_0_with_invariants_and_leaves_no_process(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "billing-worker"
    assert script.exists(), f"console script missing: {script} (pip install -e .)"
    marker = str(tmp_path / "tmp")  # the demo's tempfile.mkdtemp() lands here, and so do its processes
    Path(marker).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["TMPDIR"] = marker
    log = tmp_path / "demo.log"
    started = time.monotonic()
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [str(script), "demo"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # While it runs, the scan does see its redis-servers and Celery processes (so the final
        # "none left" below is not vacuous).
        seen = wait_until(
            lambda: [c for c in processes_mentioning(marker).values() if "redis-server" in c or "celery" in c],
            timeout_s=60,
            what="the demo's redis-server and celery processes",
            log=log,
        )
        assert seen
        demo.wait(timeout=150)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, 9)
            demo.wait(timeout=10)
    output = log.read_text(errors="replace")
    assert demo.returncode == 0, output[-4000:]
    assert "invariants hold" in output
    assert "INVARIANT BROKEN" not in output
    assert "deferred" in output  # the outage was shown
    # Signals already sent by the demo's Stack.close take effect within moments: poll, bounded.
    deadline = time.monotonic() + 10
    while (leftovers := processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers == {}, f"processes left by the demo: {leftovers}"
    assert list(Path(marker).iterdir()) == [], "the demo's temporary directory was not removed"
    print(f"demo took {time.monotonic() - started:.1f}s\n{log_tail(log, 5)}")
