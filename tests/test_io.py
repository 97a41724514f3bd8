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
