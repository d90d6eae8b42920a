"""Both callbacks take the one ``explaind_trace.RecordOptions``: as keywords or ``options=``."""

from __future__ import annotations

import pytest

import explaind_trace as et


def _callbacks():
    out = []
    lightning = pytest.importorskip("integrations.lightning")
    out.append(lightning.ExplaindCallback)
    huggingface = pytest.importorskip("integrations.huggingface")
    out.append(huggingface.ExplaindTrainerCallback)
    return out


def test_keywords_and_options_build_the_same_record_options() -> None:
    for cls in _callbacks():
        want = et.RecordOptions(checkpoint_every=5, output="head", compression_level=3)
        by_keywords = cls("a.lmdb", checkpoint_every=5, output="head", compression_level=3)
        assert by_keywords.options == want
        assert cls("a.lmdb", options=want).options is want


def test_bad_options_fail_when_the_callback_is_made() -> None:
    for cls in _callbacks():
        with pytest.raises(ValueError, match="queue_size"):
            cls("a.lmdb", queue_size=0)
        with pytest.raises(TypeError, match="options= was given together with .*checkpoint_every"):
            cls("a.lmdb", options=et.RecordOptions(), checkpoint_every=5)
        with pytest.raises(TypeError, match="unknown recording option.*chekpoint_every"):
            cls("a.lmdb", chekpoint_every=5)
        with pytest.raises(ValueError, match="store is required"):
            cls(None)
