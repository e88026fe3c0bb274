"""Loop-state files: atomic JSON, exact structure round trips, and a decision log that survives torn writes."""

import json

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from mlip_uq.active.state import DecisionLog, atoms_from_dict, atoms_to_dict, composition_key
from mlip_uq.files import write_json


def test_structures_with_labels_and_momenta_round_trip_exactly():
    atoms = bulk("MgO", "rocksalt", a=4.2)
    atoms.rattle(0.05, seed=0)
    atoms.set_momenta(np.random.default_rng(0).normal(size=(len(atoms), 3)))
    labels = {"energy": -1.2345678901234567, "forces": np.random.default_rng(1).normal(size=(len(atoms), 3)),
              "stress": np.arange(6) * 0.1}
    atoms.calc = SinglePointCalculator(atoms, **labels)
    back = atoms_from_dict(json.loads(json.dumps(atoms_to_dict(atoms, momenta=True))))
    assert np.array_equal(back.positions, atoms.positions) and np.array_equal(back.cell.array, atoms.cell.array)
    assert np.array_equal(back.get_momenta(), atoms.get_momenta()) and (back.pbc == atoms.pbc).all()
    assert back.calc.results["energy"] == labels["energy"]
    assert np.array_equal(back.calc.results["forces"], labels["forces"])
    assert np.array_equal(back.calc.results["stress"], labels["stress"])
    plain = atoms_from_dict(atoms_to_dict(molecule("H2O")))
    assert plain.calc is None and not plain.get_momenta().any()


def test_atomic_json_write_replaces_or_keeps(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_json({"a": 1}, path)
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_json({"a": 2}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


def test_decision_log_drops_unacknowledged_and_torn_lines(tmp_path):
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(path, acknowledged=0)
    for i in range(3):
        log.ensure({"decision": i, "outcome": "labelled"})
    log.ensure({"decision": 2, "outcome": "labelled"})  # already there: not repeated
    assert [r["decision"] for r in log.records()] == [0, 1, 2]
    with open(path, "a") as handle:
        handle.write('{"decision": 3, "outc')  # a kill in the middle of a line
    reopened = DecisionLog(path, acknowledged=2)  # the state had acknowledged 0 and 1 only
    assert [r["decision"] for r in reopened.records()] == [0, 1]
    reopened.ensure({"decision": 2, "outcome": "failed"})
    assert reopened.records()[-1]["outcome"] == "failed"
    with pytest.raises(ValueError, match="cannot follow"):
        reopened.ensure({"decision": 7})
    with pytest.raises(ValueError, match="do not belong together"):
        DecisionLog(path, acknowledged=5)


def test_composition_key():
    assert composition_key(molecule("CH3CH2OH")) == "C-H-O"
