"""The batch package's pure parts: input validation by line, the gate's rule, a batch's pace."""

from __future__ import annotations

import json
from pathlib import Path

from llmbalancer.batches.gate import BatchGate, poisson_quantile
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


def test_poisson_quantiles() -> None:
    assert [poisson_quantile(mean, 0.999) for mean in (0, 0.1, 1, 7, 100)] == [0, 2, 5, 16, 132]
    assert poisson_quantile(10_000, 0.999) == 10_310  # the normal approximation, past what the sum can do


def test_users_arriving_make_batch_work_keep_more_slots_free_and_it_fades() -> None:
    gate = BatchGate(None)
    backend = _backend(8, busy=4)  # 4 free
    gate.plan(0.0, 0, backends=1)
    assert gate.keep_free == 0 and gate.admits(backend)  # no users yet: all but one slot
    gate.demand.line_took(1.0)  # a batch line holds its slot for a second
    for second in range(1, 11):
        gate.plan(float(second), 3 * second, backends=1)  # three users a second
    assert round(gate.demand.rate) == 3
    assert gate.keep_free == poisson_quantile(3.0, 0.999) == 10
    assert not gate.admits(backend)  # 4 free: not enough for the users a line's time may bring
    gate.plan(20.0, 30, backends=2)
    gate.plan(25.0, 30, backends=2)  # nobody for a while: the rate and the headroom fall back
    assert gate.demand.rate == 0 and gate.keep_free == 0 and gate.admits(backend)
