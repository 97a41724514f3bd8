"""The lock and provenance: the lock pins every dependency, derived files agree with it, pyproject's
ranges admit it, and ``doctor`` reports each mismatch of the installed environment."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version
from typer.testing import CliRunner

from cascade_sd import provenance
from cascade_sd.cli import app
from cascade_sd.provenance import ROOT, Mismatch, Pin, compare, locked, normalize, overlay, read_lock


def _pyproject_requirements() -> list[Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def test_lock_pins_every_dependency_with_hashes_and_torch_apart():
    lock = read_lock(ROOT / provenance.LOCK)
    torch_pin = read_lock(ROOT / provenance.TORCH_PIN)
    assert list(torch_pin) == ["torch"] and "torch" not in lock
    assert all(p.hashes for p in lock.values()), "pip's hash-checking mode needs a hash on every pin"
    assert not [n for n in lock if n.startswith("nvidia-") or n == "triton"], "resolved from a CUDA torch"
    for req in _pyproject_requirements():
        pin = locked()[normalize(req.name)]
        assert req.specifier.contains(pin.version), f"{req.name}=={pin.version} outside pyproject's {req.specifier}"


def test_pyproject_ranges_have_upper_bounds():
    for req in _pyproject_requirements():
        assert any(s.operator in ("<", "<=", "~=", "==") for s in req.specifier), f"{req.name} has no upper bound"


def test_environment_yml_is_the_lock():
    text = (ROOT / "environment.yml").read_text()
    pins = dict(re.findall(r"^      - ([A-Za-z0-9._-]+)==(\S+)$", text, flags=re.M))
    assert {normalize(n): v for n, v in pins.items()} == {n: p.version for n, p in locked().items()}
    assert text == provenance.environment_yml(locked())


def test_lowest_transformers_is_pyprojects_lower_bound():
    spec = next(r.specifier for r in _pyproject_requirements() if r.name == "transformers")
    lower = next(s.version for s in spec if s.operator == ">=")
    wanted = re.search(r"^transformers\S*==(\S+)$", (ROOT / ".ci/transformers-lowest.in").read_text(), re.M).group(1)
    lowest = read_lock(ROOT / ".ci/transformers-lowest.lock")
    assert Version(wanted) == Version(lower)
    assert lowest["transformers"].version == wanted and spec.contains(wanted)


def test_read_lock_joins_hash_continuations_and_rejects_non_pins(tmp_path):
    f = tmp_path / "r.lock"
    f.write_text("# header\nFoo_Bar==1.2 \\\n    --hash=sha256:" + "a" * 64 + " \\\n    --hash=sha256:" + "b" * 64
                 + "\n    # via x\nbaz[extra]==3.0+cpu\n")
    assert read_lock(f) == {"foo-bar": Pin("foo-bar", "1.2", ("sha256:" + "a" * 64, "sha256:" + "b" * 64)),
                            "baz": Pin("baz", "3.0+cpu")}
    f.write_text("foo>=1\n")
    with pytest.raises(provenance.DataError, match="'foo>=1' is not a name==version pin"):
        read_lock(f)


def test_compare_names_each_mismatch_and_ignores_build_labels():
    pins = {"a": Pin("a", "1.0"), "b": Pin("b", "2.0"), "torch": Pin("torch", "2.13.0")}
    have = {"a": "1.0", "torch": "2.13.0+cu128", "c": "0.1", "pip": "23"}
    assert compare(pins, have) == ([Mismatch("b", "2.0", None)], ["c"])
    assert compare(pins, have | {"a": "1.1", "b": "2.0"}) == ([Mismatch("a", "1.0", "1.1")], ["c"])


def test_overlay_holds_exactly_the_differing_pins_with_hashes():
    main = {"a": Pin("a", "1.0", ("sha256:1",)), "b": Pin("b", "2.0", ("sha256:2",))}
    lowest = {"a": Pin("a", "1.0", ("sha256:1",)), "b": Pin("b", "1.5", ("sha256:3",)), "k": Pin("k", "0.1", ("sha256:4",))}
    assert overlay(lowest, main) == "b==1.5 \\\n    --hash=sha256:3\nk==0.1 \\\n    --hash=sha256:4\n"


def test_doctor_reports_each_mismatch_and_exits_1(monkeypatch):
    runner = CliRunner()
    same = {n: p.version for n, p in locked().items()}
    monkeypatch.setattr(provenance, "installed", lambda: same)
    ok = runner.invoke(app, ["doctor"])
    assert ok.exit_code == 0 and f"matches the lock ({len(same)} packages)" in ok.output
    changed = same | {"numpy": "1.26.4"}
    changed.pop("sympy")
    monkeypatch.setattr(provenance, "installed", lambda: changed)
    bad = runner.invoke(app, ["doctor"])
    assert bad.exit_code == 1 and "DOES NOT MATCH the lock: 2 of" in bad.output
    rows = {tuple(line.split()) for line in bad.output.splitlines()}
    assert ("numpy", same["numpy"], "1.26.4") in rows and ("sympy", same["sympy"], "missing") in rows


def test_doctor_outside_a_checkout_says_the_lock_is_missing(tmp_path):
    result = CliRunner().invoke(app, ["doctor", "--lock-root", str(tmp_path)])
    assert result.exit_code == 0 and "not found in" in result.output and "not compared" in result.output
