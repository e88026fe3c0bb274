"""Run logs that survive a kill (:func:`mlip_uq.files.appending_csv`)."""

import csv

from mlip_uq.files import appending_csv

FIELDS = ["step", "loss"]


def write(path, start, stop):
    with appending_csv(path, FIELDS, "step", start) as rows:
        for step in range(start, stop):
            rows.writerow({"step": step, "loss": 1.0 / (step + 1)})


def steps(path):
    return [int(r["step"]) for r in csv.DictReader(open(path))]


def test_each_row_reaches_the_file_as_it_is_written(tmp_path):
    path = tmp_path / "trace.csv"
    with appending_csv(path, FIELDS, "step", 0) as rows:
        for step in range(3):
            rows.writerow({"step": step, "loss": 0.5})
            assert steps(path) == list(range(step + 1))  # read back before the block ends


def test_a_resume_cuts_the_rows_after_its_checkpoint_and_keeps_those_before_byte_for_byte(tmp_path):
    path = tmp_path / "trace.csv"
    write(path, 0, 10)
    before = path.read_bytes()
    write(path, 6, 12)  # resumed from a checkpoint at step 6: steps 6..9 are written again
    assert steps(path) == list(range(12))
    assert path.read_bytes().startswith(before[: before.index(b"\n6,")])


def test_a_line_cut_short_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "trace.csv"
    write(path, 0, 5)
    with open(path, "ab") as handle:
        handle.write(b"5,0.1")  # a kill in the middle of a row: no line end
    write(path, 5, 7)
    assert steps(path) == list(range(7))
    write(path, 9, 10)  # a resume past every row on disk appends
    assert steps(path) == [*range(7), 9]


def test_a_fresh_start_replaces_an_earlier_log(tmp_path):
    path = tmp_path / "trace.csv"
    write(path, 0, 8)
    write(path, 0, 2)
    assert steps(path) == [0, 1]


def test_a_pickled_checkpoint_is_refused_by_name(tmp_path):
    import pytest
    import torch

    from mlip_uq.files import load_checkpoint

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module
    with pytest.raises(ValueError, match=r"checkpoint .*module\.pt cannot be loaded safely"):
        load_checkpoint(tmp_path / "module.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pt cannot be loaded safely"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError, match="none.pt does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, tmp_path / "plain.pt")
    assert load_checkpoint(tmp_path / "plain.pt")["epoch"] == 3
