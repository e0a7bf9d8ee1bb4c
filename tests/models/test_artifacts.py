"""app.models.artifacts: which model an ONNX export came from, and whether it is older than that model."""

import json
import os

from app.models.artifacts import META_FILE, onnx_is_stale


def test_an_onnx_export_is_stale_only_when_its_source_was_written_after_it(tmp_path):
    source, onnx = tmp_path / "merged", tmp_path / "merged" / "onnx"
    onnx.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    assert onnx_is_stale(onnx) is None  # no export record: nothing to compare
    (onnx / META_FILE).write_text(json.dumps({"source": str(source)}))
    os.utime(source / "config.json", (1_000, 1_000))
    os.utime(onnx / META_FILE, (2_000, 2_000))
    assert onnx_is_stale(onnx) is None  # exported after its model was written
    os.utime(source / "config.json", (3_000, 3_000))  # merged again since
    assert onnx_is_stale(onnx) == source
    (source / "config.json").unlink()
    assert onnx_is_stale(onnx) is None  # the source is gone: nothing to say
    (onnx / META_FILE).write_text(json.dumps({"source": ""}))
    assert onnx_is_stale(onnx) is None
