"""The core's version gate (blockquant.frame.layouts.LayoutGate), as a third-party adapter would use it."""
import logging

import pytest
from packaging.version import Version

from blockquant.errors import VersionError
from blockquant.frame.layouts import LayoutGate

GATE = LayoutGate("demo", "transformers", oldest="5.5.4", newest_tested="5.24.0", what="cache layout",
                  known={"list": "replay A", "dict": "replay B"}, refused={None: "it keeps no cache at all"})


def test_known_layout_runs_and_newer_releases_warn_once(caplog):
    with caplog.at_level(logging.WARNING, logger="blockquant"):
        assert GATE.choose("dict", "uses a dict", Version("5.20.0")) == "replay B"
        assert not caplog.records
        for _ in range(3):
            assert GATE.choose("list", "uses a list", Version("5.30.0")) == "replay A"
    assert len(caplog.records) == 1
    assert "transformers 5.30.0 is newer than 5.24.0" in caplog.text and "cache layout (replay A)" in caplog.text


def test_unknown_and_refused_layouts_name_what_was_seen_and_the_fix():
    with pytest.raises(VersionError, match=r"transformers 5.40.0 passes a tuple, a cache layout the demo adapter "
                                           r"does not know yet \(known: replay A, replay B\); .*<=5.24.0"):
        GATE.choose("tuple", "passes a tuple", Version("5.40.0"))
    with pytest.raises(VersionError, match=r"5.5.2 is not supported by the demo adapter: it keeps no cache at all; "
                                           r"pip install 'transformers>=5.5.4,<6'"):
        GATE.choose(None, "has none", Version("5.5.2"))


def test_requirement_spans_to_the_next_major_release_and_the_installed_version_is_read():
    assert GATE.requirement == ">=5.5.4,<6"
    import transformers
    assert GATE.installed() == Version(transformers.__version__)
