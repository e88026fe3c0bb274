"""Command-line input errors: reported by name with exit code 2, never as a traceback."""

import re

import pytest

from mlip_uq.cli import main


@pytest.mark.parametrize("content, message", [
    (None, "split file .* does not exist"),
    ("{not json", "is not valid JSON"),
    (b"\xff\xfe\x00", "is not valid JSON"),
    ("[1, 2, 3]", "must map split names to frame indices"),
    ('{"train": [0, 1]}', "has no split 'val'"),
])
def test_bad_split_file_is_named(tmp_path, capsys, content, message):
    split = tmp_path / "splits.json"
    if isinstance(content, bytes):
        split.write_bytes(content)
    elif content is not None:
        split.write_text(content)
    for command in ("evaluate", "calibrate"):
        assert main([command, str(tmp_path / "p.h5"), str(tmp_path / "d.extxyz"), "--split", str(split),
                     "--split-name", "val"]) == 2
        err = capsys.readouterr().err
        assert f"mlip-uq {command}: error:" in err
        assert re.search(message, err), err
