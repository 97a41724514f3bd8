"""Atomic outputs: a failed write leaves the previous file intact and no temporary behind."""

import json
import os
import stat

import pytest

from cascade_sd.io import _atomic_write, atomic_write_json


def test_write_and_permissions(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "x.json", {"b": 1})
    assert json.loads(path.read_text()) == {"b": 1}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_failed_write_keeps_old_file(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"old": True})

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        _atomic_write(path, boom)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _decode_killed_before_stats(out, seed: int) -> int:
    """`cascade-sd decode` in a fresh interpreter that SIGKILLs itself just before writing stats.json (its last
    file); the exit status."""
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "import cascade_sd.io as io\n"
        "io.atomic_write_json = lambda path, obj: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from cascade_sd.cli import run\n"
        f"run(['decode', '--bundle', 'toy:vocab=7,len=12,seed=0', '--per-class', '2', '--seed', '{seed}', "
        f"'--out-dir', {str(out)!r}])\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True).returncode


def test_a_decode_folder_is_all_or_nothing_under_sigkill(tmp_path):
    """Killed between its files, `decode` leaves no folder (only a hidden temporary one); killed while
    replacing a complete folder, it leaves the old folder whole."""
    import json
    import signal

    from cascade_sd.cli import run

    out = tmp_path / "out"
    assert _decode_killed_before_stats(out, seed=0) == -signal.SIGKILL
    assert not out.exists() and all(p.name.startswith(".out.") for p in tmp_path.iterdir())
    assert run(["decode", "--bundle", "toy:vocab=7,len=12,seed=0", "--per-class", "2", "--out-dir", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"tokens.npz", "stats.json"} <= set(before) and json.loads(before["stats.json"])["seed"] == 0
    assert _decode_killed_before_stats(out, seed=1) == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
