"""The registry: lazy entries, clear unknown-name errors, and entry-point plugins."""

from __future__ import annotations

import sys

import pytest

from harness.registry import METHODS, MODELS, TASKS, Registry, UnknownName


def test_builtin_names():
    assert {"autoregressive", "hf-generate"} <= set(METHODS.names())
    assert {"humaneval", "humaneval-x", "spec-bench", "jsonl"} <= set(TASKS.names())
    assert {"random-tiny", "zoo-target", "zoo-draft"} <= set(MODELS.names())


def test_every_entry_resolves():
    for reg in (METHODS, TASKS, MODELS):
        for name in reg.names():
            assert reg.get(name) is not None


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UnknownName) as err:
        METHODS.get("nope")
    assert str(err.value).startswith("unknown method 'nope'; valid methods: ") and "autoregressive" in str(err.value)


def test_one_line_registration():
    reg = Registry("widget", "harness.test-widgets")
    reg.add("json-dumps", "json:dumps")
    import json

    assert reg.get("json-dumps") is json.dumps and reg.names() == ["json-dumps"]


def test_entry_point_plugin(tmp_path, monkeypatch):
    """An installed out-of-tree package is found through the entry-point group."""
    dist = tmp_path / "my_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[harness.methods]\nmy-method = my_plugin_mod:MyMethod\n")
    (tmp_path / "my_plugin_mod.py").write_text("class MyMethod:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("method", "harness.methods")  # a fresh registry sees the new path
    assert "my-method" in reg.names()
    assert reg.get("my-method").__name__ == "MyMethod"
    sys.modules.pop("my_plugin_mod", None)
