"""A batch's input file checked as OpenAI checks it, line by line, streamed from disk (blocking: run it in a
thread). Every line is a JSON object ``{custom_id, method: "POST", url, body}`` whose ``url`` is the batch's
endpoint and whose ``body`` is an object that does not ask for a stream; ``custom_id`` s are unique. Blank
lines are skipped. Problems are reported by line number (1-based), at most ``MAX_ERRORS`` of them.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmbalancer.batches.records import new_id

MAX_ERRORS = 1000
INSERT_CHUNK = 1000


@dataclass
class Checked:
    lines: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    models: set[str] = field(default_factory=set)

    def add(self, code: str, message: str, line: int | None = None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})
        elif len(self.errors) == MAX_ERRORS:
            self.errors.append({"code": "too_many_errors", "message": f"Only the first {MAX_ERRORS} errors are "
                                "listed", "param": None, "line": None})

    @property
    def model(self) -> str | None:
        """The model every line names, when they all name the same one."""
        return next(iter(self.models)) if len(self.models) == 1 else None


def check_file(path: Path, endpoint: str, max_lines: int) -> Checked:
    checked = Checked()
    seen: set[str] = set()
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            checked.lines += 1
            if checked.lines > max_lines:
                checked.add("too_many_requests", f"The input file holds more than {max_lines} requests "
                            "(batch.max_lines)", number)
                break
            parsed = _line(raw, number, endpoint, checked)
            if parsed is None:
                continue
            custom_id, body = parsed
            if custom_id in seen:
                checked.add("duplicate_custom_id", "The custom_id for this request is a duplicate of another "
                            "request. The custom_id parameter must be unique for each request in a batch.",
                            number, "custom_id")
                continue
            seen.add(custom_id)
            model = body.get("model")
            if isinstance(model, str):
                checked.models.add(model)
    if checked.lines == 0:
        checked.add("empty_file", "The input file holds no requests")
    return checked


def read_lines(path: Path) -> Generator[list[tuple[int, str, str, str]], None, None]:
    """The checked file's requests as ``(line, custom_id, request_id, body)`` rows, ``INSERT_CHUNK`` at a time."""
    chunk: list[tuple[int, str, str, str]] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            item = json.loads(raw)
            body = json.dumps(item["body"], ensure_ascii=False, separators=(",", ":"))
            chunk.append((number, item["custom_id"], new_id("batch_req_"), body))
            if len(chunk) >= INSERT_CHUNK:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _line(raw: bytes, number: int, endpoint: str, checked: Checked) -> tuple[str, dict[str, Any]] | None:
    try:
        item = json.loads(raw)
    except (ValueError, RecursionError):
        checked.add("invalid_json_line", "This line is not parseable as valid JSON.", number)
        return None
    if not isinstance(item, dict):
        checked.add("invalid_json_line", "This line is not a JSON object.", number)
        return None
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        checked.add("invalid_request", "custom_id must be a non-empty string", number, "custom_id")
        return None
    if item.get("method") != "POST":
        checked.add("invalid_request", "method must be POST", number, "method")
        return None
    url = item.get("url")
    if url != endpoint:
        checked.add("invalid_url", f"The url {str(url)[:100]!r} does not match the batch's endpoint {endpoint}",
                    number, "url")
        return None
    body = item.get("body")
    if not isinstance(body, dict):
        checked.add("invalid_request", "body must be a JSON object", number, "body")
        return None
    if body.get("stream") is True:
        checked.add("invalid_request", "Streaming is not supported in batches (body.stream)", number, "body.stream")
        return None
    try:
        custom_id.encode()
        json.dumps(body, ensure_ascii=False).encode()
    except (UnicodeEncodeError, RecursionError):
        checked.add("invalid_json_line", "This line holds a string that is not valid Unicode.", number)
        return None
    return custom_id, body
