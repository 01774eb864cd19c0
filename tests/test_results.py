"""The results files of a run directory: rows, appends, re-runs, provenance, crashes."""

from __future__ import annotations

import csv
import json
import os

import pytest

from krrst.infra.errors import KrrstError
from krrst.results import (
    RESULT_FIELDS,
    append_results,
    check_provenance,
    has_result,
    method_provenance,
    read_results,
    remove_results,
    result_row,
    row_key,
)


def row(method="krr-st", target="cifar10", protocol="finetune", seed=0, accuracy=0.5, arch="convnet3", source="cifar10"):
    return {
        "method": method,
        "source": source,
        "target": target,
        "arch": arch,
        "protocol": protocol,
        "seed": seed,
        "accuracy": accuracy,
        "wall_time_s": 1.5,
    }


def test_append_results_accumulates_and_both_files_parse(tmp_path):
    append_results(tmp_path, [row(seed=0, accuracy=0.5), row(seed=1, accuracy=0.25)])
    append_results(tmp_path, [row(method="random", seed=0, accuracy=0.125)])

    rows = read_results(tmp_path)
    assert [(r["method"], r["seed"], r["accuracy"]) for r in rows] == [
        ("krr-st", 0, 0.5),
        ("krr-st", 1, 0.25),
        ("random", 0, 0.125),
    ]
    assert all(isinstance(r["seed"], int) and isinstance(r["accuracy"], float) for r in rows)
    assert all(isinstance(r["wall_time_s"], float) for r in rows)

    with open(tmp_path / "results.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == 3 and tuple(csv_rows[0]) == RESULT_FIELDS
    json_rows = json.loads((tmp_path / "results.json").read_text())
    assert json_rows == rows


def test_rerun_of_same_evaluation_replaces_its_row(tmp_path):
    append_results(tmp_path, [row(seed=0, accuracy=0.5), row(seed=1, accuracy=0.6)])
    append_results(tmp_path, [row(seed=0, accuracy=0.7)])
    rows = read_results(tmp_path)
    assert sorted((r["seed"], r["accuracy"]) for r in rows) == [(0, 0.7), (1, 0.6)]


def test_float_values_round_trip_exactly(tmp_path):
    accuracy = 0.1 + 0.2  # not representable in a short decimal
    append_results(tmp_path, [row(accuracy=accuracy)])
    assert read_results(tmp_path)[0]["accuracy"] == accuracy


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda r: r.pop("accuracy"), "missing accuracy"),
        (lambda r: r.update(top5=0.9), "unknown top5"),
        (lambda r: r.update(accuracy=52.0), "fraction in \\[0, 1\\]"),
        (lambda r: r.update(seed="one"), "seed must be an integer"),
        (lambda r: r.update(method=""), "method must not be empty"),
    ],
)
def test_bad_row_is_a_one_line_error_and_writes_nothing(tmp_path, change, expected):
    append_results(tmp_path, [row(seed=0)])
    before = (tmp_path / "results.csv").read_bytes()
    bad = row(seed=1)
    change(bad)
    with pytest.raises(KrrstError, match=expected) as info:
        append_results(tmp_path, [row(seed=2), bad])
    assert "\n" not in str(info.value)
    assert (tmp_path / "results.csv").read_bytes() == before


def test_crash_during_rename_leaves_previous_results_intact(tmp_path, monkeypatch):
    append_results(tmp_path, [row(seed=0)])
    csv_before = (tmp_path / "results.csv").read_bytes()
    json_before = (tmp_path / "results.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        append_results(tmp_path, [row(seed=1)])
    monkeypatch.undo()

    assert (tmp_path / "results.csv").read_bytes() == csv_before
    assert (tmp_path / "results.json").read_bytes() == json_before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_crash_halfway_through_writing_leaves_previous_results_intact(tmp_path, monkeypatch):
    append_results(tmp_path, [row(seed=0), row(seed=1)])
    csv_before = (tmp_path / "results.csv").read_bytes()
    real_writerow = csv.DictWriter.writerow
    calls = {"n": 0}

    def writerow_then_crash(self, data):
        calls["n"] += 1
        if calls["n"] > 2:  # the header and one row are already in the temporary file
            raise KeyboardInterrupt
        return real_writerow(self, data)

    monkeypatch.setattr(csv.DictWriter, "writerow", writerow_then_crash)
    with pytest.raises(KeyboardInterrupt):
        append_results(tmp_path, [row(seed=2)])
    monkeypatch.undo()

    assert calls["n"] == 3
    assert (tmp_path / "results.csv").read_bytes() == csv_before
    assert [r["seed"] for r in read_results(tmp_path)] == [0, 1]


def test_read_results_rejects_a_foreign_csv(tmp_path):
    (tmp_path / "results.csv").write_text("method,accuracy\nkrr-st,0.5\n")
    with pytest.raises(KrrstError, match="header"):
        read_results(tmp_path)
    assert read_results(tmp_path / "absent") == []


def test_an_older_results_file_without_provenance_loads_and_is_upgraded_on_append(tmp_path):
    old_header = ",".join(RESULT_FIELDS[:-1])
    assert RESULT_FIELDS[-1] == "provenance" and old_header.count(",") == 7
    (tmp_path / "results.csv").write_text(f"{old_header}\nkrr-st,cifar10,cifar10,convnet3,finetune,0,0.5,1.5\n")
    assert [(r["method"], r["seed"], r["provenance"]) for r in read_results(tmp_path)] == [("krr-st", 0, "")]
    append_results(tmp_path, [{**row(seed=1), "provenance": "sha256:00112233aabbccdd"}])
    with open(tmp_path / "results.csv", newline="") as handle:
        stored = list(csv.DictReader(handle))
    assert tuple(stored[0]) == RESULT_FIELDS, "rewritten in the current layout"
    assert [(r["seed"], r["provenance"]) for r in stored] == [("0", ""), ("1", "sha256:00112233aabbccdd")]
    assert json.loads((tmp_path / "results.json").read_text()) == read_results(tmp_path)


def test_rows_of_another_provenance_under_the_same_method_are_refused_naming_both(tmp_path):
    first, second = "sha256:00112233aabbccdd", "sha256:ffeeddccbbaa9988"
    append_results(tmp_path, [{**row(seed=0), "provenance": first}, row(method="random", seed=0)])
    before = (tmp_path / "results.csv").read_bytes()
    with pytest.raises(KrrstError) as info:
        append_results(tmp_path, [{**row(seed=1), "provenance": second}])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'results.csv'}: ")
    assert f"method 'krr-st' come from {first}, these from {second}" in message
    with pytest.raises(KrrstError, match="these from sha256:ffeeddccbbaa9988"):  # a re-run of a recorded row too
        append_results(tmp_path, [{**row(seed=0), "provenance": second}])
    with pytest.raises(KrrstError, match="method 'random' come from a, these from b"):  # within one call
        append_results(tmp_path, [{**row(method="random", seed=1), "provenance": p} for p in "ab"])
    with pytest.raises(KrrstError, match=f"come from {first}, these from {second}"):
        check_provenance(tmp_path, {"krr-st": second})
    assert (tmp_path / "results.csv").read_bytes() == before
    # the same provenance, or none (an unknown one), joins; another method is another set
    check_provenance(tmp_path, {"krr-st": first, "kmeans": second})
    append_results(tmp_path, [{**row(seed=1), "provenance": first}, row(seed=2), {**row(method="kmeans"), "provenance": second}])
    assert method_provenance(read_results(tmp_path)) == {"krr-st": first, "kmeans": second}


def test_has_result_matches_finished_jobs(tmp_path):
    append_results(tmp_path, [row(method="krr-st", seed=0), row(method="random", seed=1, protocol="linear@1%")])
    rows = read_results(tmp_path)
    key = dict(target="cifar10", arch="convnet3")
    assert has_result(rows, method="krr-st", protocol="finetune", seed=0, **key)
    assert has_result(rows, method="random", protocol="linear@1%", seed="1", **key)
    assert not has_result(rows, method="krr-st", protocol="finetune", seed=1, **key)
    assert not has_result(rows, method="random", protocol="linear@10%", seed=1, **key)
    with pytest.raises(TypeError, match="unknown field"):
        has_result(rows, model="x")


def test_result_row_has_exactly_the_fields_and_row_key_names_the_evaluation(tmp_path):
    built = result_row(method="krr-st", source="cifar10", target="cifar10", arch="convnet3", protocol="finetune",
                       seed="1", accuracy=0.5, wall_time_s=2)
    assert tuple(built) == RESULT_FIELDS and built["provenance"] == ""
    assert (built["seed"], built["accuracy"], built["wall_time_s"]) == (1, 0.5, 2.0)
    assert row_key(built) == ("krr-st", "cifar10", "cifar10", "convnet3", "finetune", 1)
    assert row_key({**built, "seed": "1", "accuracy": 0.9}) == row_key(built), "accuracy and time are not the key"
    append_results(tmp_path, [built, {**built, "protocol": "linear"}])
    assert [row_key(r) for r in read_results(tmp_path)] == [row_key(built), row_key({**built, "protocol": "linear"})]


def test_remove_results_drops_rows_from_both_files(tmp_path):
    append_results(tmp_path, [row(seed=0), row(seed=1), row(method="random", seed=0)])
    assert remove_results(tmp_path, lambda r: r["method"] == "krr-st" and r["seed"] == 1) == 1
    kept = [(r["method"], r["seed"]) for r in read_results(tmp_path)]
    assert kept == [("krr-st", 0), ("random", 0)]
    assert json.loads((tmp_path / "results.json").read_text()) == read_results(tmp_path)
    before = (tmp_path / "results.csv").read_bytes()
    assert remove_results(tmp_path, lambda r: False) == 0
    assert (tmp_path / "results.csv").read_bytes() == before
