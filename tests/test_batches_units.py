"""The batch package's pure parts: input validation by line, the gate's rule, a batch's pace."""

from __future__ import annotations

import json
from pathlib import Path

from llmbalancer.batches.gate import BatchGate
from llmbalancer.batches.records import priority_of
from llmbalancer.batches.validation import MAX_ERRORS, check_file, read_lines
from llmbalancer.fleet.backend import Backend


def _write(tmp_path: Path, lines: list[object]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _line(custom_id: str, **extra: object) -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "m", "input": "x"}, **extra}


def test_a_valid_file_is_read_back_as_its_lines_with_blank_lines_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path, [_line("a"), "", "   ", _line("b")])
    checked = check_file(path, "/v1/embeddings", max_lines=10)
    assert (checked.lines, checked.errors, checked.model) == (2, [], "m")
    [chunk] = list(read_lines(path))
    assert [(number, custom_id) for number, custom_id, _, _ in chunk] == [(1, "a"), (4, "b")]
    assert all(request_id.startswith("batch_req_") for _, _, request_id, _ in chunk)
    assert json.loads(chunk[0][3]) == {"model": "m", "input": "x"}


def test_problems_are_named_by_line_and_bounded(tmp_path: Path) -> None:
    assert check_file(_write(tmp_path, [""]), "/v1/embeddings", 10).errors[0]["code"] == "empty_file"
    too_many = check_file(_write(tmp_path, [_line(str(i)) for i in range(4)]), "/v1/embeddings", 3)
    assert [(e["code"], e["line"]) for e in too_many.errors] == [("too_many_requests", 4)]
    lone = _write(tmp_path, ['{"custom_id": "\\ud800", "method": "POST", "url": "/v1/embeddings", "body": {}}'])
    assert check_file(lone, "/v1/embeddings", 10).errors[0]["code"] == "invalid_json_line"
    many = check_file(_write(tmp_path, ["[1]"] * (MAX_ERRORS + 5)), "/v1/embeddings", 10_000)
    assert len(many.errors) == MAX_ERRORS + 1 and many.errors[-1]["code"] == "too_many_errors"
    mixed = check_file(_write(tmp_path, [_line("a", body={"model": "x"}), _line("b")]), "/v1/embeddings", 10)
    assert mixed.errors == [] and mixed.model is None  # lines naming different models: no one model


def _backend(slots: int | None, busy: int = 0) -> Backend:
    backend = Backend(name="b", url="http://b")
    backend.health.slots_total = slots
    backend.traffic.in_flight = busy
    return backend


def test_the_gate_leaves_each_backend_one_free_slot_unless_told_a_cap() -> None:
    gate = BatchGate(None)
    assert gate.admits(_backend(4, busy=2))  # 2 free: one for a line, one left
    assert not gate.admits(_backend(4, busy=3))  # its last free slot
    assert not gate.admits(_backend(1))  # a one-slot server takes no batch line by default
    unknown = _backend(None)
    assert gate.admits(unknown)
    gate.take(unknown)
    assert not gate.admits(unknown) and gate.total == 1  # capacity unknown: one line at a time
    gate.give_back(unknown)
    assert gate.total == 0 and not gate.held
    capped = BatchGate(2)
    one_slot = _backend(1)
    assert capped.admits(one_slot)
    capped.take(one_slot)
    capped.take(one_slot)
    assert not capped.admits(one_slot)


def test_metadata_priority_is_a_whole_number_or_zero() -> None:
    assert [priority_of(m) for m in (None, {}, {"priority": "5"}, {"priority": " -2 "}, {"priority": "high"},
                                     {"priority": "99999"})] == [0, 0, 5, -2, 0, 1000]
