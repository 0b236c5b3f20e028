"""Atomic writes and config JSON round trips (sane_hf.serialization)."""

from __future__ import annotations

import dataclasses
import os
import stat

import pytest

from sane_hf.serialization import JsonConfigMixin, atomic_path, atomic_write_text


def test_atomic_write_replaces_and_uses_the_usual_file_mode(tmp_path):
    target = tmp_path / "sub" / "f.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@dataclasses.dataclass
class _Config(JsonConfigMixin):
    lr: float = 1e-3
    name: str = "x"


def test_json_config_round_trip_and_unknown_fields(tmp_path):
    path = tmp_path / "c.json"
    _Config(lr=0.5, name="y").to_json_file(path)
    assert _Config.from_json_file(path) == _Config(lr=0.5, name="y")
    with pytest.raises(ValueError, match=r"unknown _Config fields \['lrr'\]"):
        _Config.from_dict({"lrr": 1.0})
