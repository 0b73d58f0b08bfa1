"""`pip install .` (not editable) must ship the Lua scripts inside the wheel, loadable by name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONTRACT_SCRIPTS = {
    "fence_validate_advance",
    "lease_acquire",
    "lease_renew",
    "lease_release",
    "credit_issue",
    "credit_apply",
}


def test_wheel_ships_lua_and_loads_it_when_installed(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("billing_worker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).stem for n in names if n.startswith("worker/lua/") and n.endswith(".lua")}
    assert shipped >= CONTRACT_SCRIPTS
    assert "tasks/__init__.py" in names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        cwd=tmp_path,
    )
    probe = (
        "import worker.scripts as s, pathlib;"
        "d = s.lua_dir(); print(d);"
        "print(sorted(p.stem for p in d.glob('*.lua')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert Path(out[0]).resolve() == (site / "worker" / "lua").resolve()
    assert set(eval(out[1])) >= CONTRACT_SCRIPTS
