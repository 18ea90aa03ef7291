"""A fixed-seed corpus of hostile requests against `python -m llmbalancer serve` (a child process) in front of
the fake llama-server: malformed bodies through aiohttp, malformed heads, headers and targets over raw
sockets. The balancer never answers a 500 of its own (a 5xx is a backend's, relayed, or carries an
upstream-origin code), never logs an unhandled error, never hangs an exchange, still answers /health
afterwards, and its resident memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from llmbalancer.testing.fake_llama import run_fake_llama
from tests.support import REPO, free_port

# Fixed in CI; FUZZ_SEED=<n> explores another corpus locally.
SEED = int(os.environ.get("FUZZ_SEED", "20261207"))
RAW_CASES = 300
BODY_CASES = 200
MAX_BODY = 1_048_576
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
# What a 5xx the balancer answers itself may say: each names a backend's doing (or none being there).
UPSTREAM_CODES = {
    "upstream_unreachable", "upstream_timeout", "upstream_stream_broken", "upstream_protocol_error",
    "no_backend_available", "queue_full", "queue_timeout",
}
JSON_ROUTES = [
    "/v1/chat/completions", "/v1/completions", "/completion", "/v1/embeddings", "/tokenize", "/infill",
    "/api/chat", "/api/generate", "/api/show", "/v1/rerank", "/chat/completions",
]
OWN_PATHS = ["/health", "/metrics", "/llmhealth", "/llmhealth-snapshot", "/llmhealth-monitor", "/admin/instances",
             "/admin/instances/x/stop", "/admin/x"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO", "get", "X" * 300]
VALID_CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@dataclass
class Case:
    name: str
    raw: bytes = b""  # sent over a raw socket, when set
    method: str = "POST"  # else through aiohttp:
    path: str = "/v1/chat/completions"
    body: bytes = b""
    content_type: str | None = "application/json"


# Bodies ---------------------------------------------------------------------------------------------------

def _nested(rng: random.Random) -> bytes:
    depth = rng.choice([50, 900, 990, 1000, 1200, 5000, 100_000])
    inner = b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"model": "smollm2", "messages": ' + inner + b"}"


def _numbers(rng: random.Random) -> bytes:
    value = rng.choice([
        b"7" * rng.randint(4200, 20_000), b"-" + b"9" * 5000, b"1e999", b"-1e999", b"1e-999", b"0." + b"1" * 5000,
        b"NaN", b"Infinity", b"-Infinity", b"1" * 4300, b"00", b"1.", b"+1", b"0x10",
    ])
    key = rng.choice([b"max_tokens", b"temperature", b"n", b"seed", b"top_p"])
    return b'{"model": "smollm2", "messages": [], "' + key + b'": ' + value + b"}"


def _bad_text(rng: random.Random) -> bytes:
    raw = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00", b"\xf4\x90\x80\x80"])
    escaped = rng.choice([b"\\ud800", b"\\udfff", b"\\ud800\\u0041", b"\\u0000", b"\\uZZZZ", b"\\x41", b"\\"])
    content = rng.choice([raw, escaped, raw + escaped])
    where = rng.choice(["model", "content", "role", "key"])
    if where == "model":
        return b'{"model": "' + content + b'", "messages": []}'
    if where == "key":
        return b'{"model": "smollm2", "' + content + b'": 1, "messages": []}'
    return b'{"model": "smollm2", "messages": [{"role": "user", "content": "' + content + b'"}]}'


def _encodings(rng: random.Random) -> bytes:
    text = json.dumps(VALID_CHAT)
    return rng.choice([
        text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-32"), b"\xef\xbb\xbf" + text.encode(),
        text.encode("utf-16-be"),
    ])


WRONG = [1, 1.5, -1, None, True, False, [], {}, ["smollm2"], {"x": 1}, "", "x" * 70_000, "smollm2\u0000",
         "../../etc/passwd", "smollm2\r\nX-Injected: 1", [[[[]]]], "\ud800"]
MESSAGES = ["hi", 1, None, [1, 2], [None], [{"role": 1, "content": {"a": 1}}], [[]], {"role": "user"},
            [{"content": [{"type": "text", "text": 5}]}], [{"content": [{"text": None}, 7, "x"]}],
            [{"role": "system", "content": ["x"]}],
            [{"role": "user", "content": "x" * 200_000}], [{"role": "user", "content": "\ud800"}]]


def _wrong_types(rng: random.Random) -> bytes:
    body: dict[str, object] = dict(VALID_CHAT)
    for key in rng.sample(["model", "messages", "stream", "stream_options", "max_tokens", "prompt", "user", "n"],
                          rng.randint(1, 4)):
        if key == "messages":
            body[key] = rng.choice(MESSAGES)
        elif key == "stream":
            body[key] = rng.choice([*WRONG, True])
        elif key == "stream_options":
            body[key] = rng.choice([1, "x", [], {"include_usage": "yes"}, {"include_usage": True}, None])
        else:
            body[key] = rng.choice(WRONG)
    return json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


def _duplicates(rng: random.Random) -> bytes:
    return rng.choice([
        b'{"model": "smollm2", "model": "other", "messages": []}',
        b'{"model": "smollm2", "messages": [], "stream": true, "stream": false}',
        b'{"model": "smollm2", "messages": [], "messages": 5}',
        b'{"stream": true, "model": "smollm2", "messages": [{"role": "user", "content": "a"}], "stream": "x"}',
    ])


def _shapes(rng: random.Random) -> bytes:
    valid = json.dumps(VALID_CHAT).encode()
    return rng.choice([
        b"", b"   ", b"[]", b'"str"', b"1", b"null", b"true", valid[: rng.randint(1, len(valid) - 1)],
        valid + b"garbage", valid + valid, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000))),
        b"{" * 3, b'{"model": "smollm2"', b"x" * (MAX_BODY + 10),
    ])


BODY_MAKERS: list[Callable[[random.Random], bytes]] = [
    _nested, _numbers, _bad_text, _encodings, _wrong_types, _duplicates, _shapes,
]
CONTENT_TYPES = ["application/json", None, "text/plain", "application/octet-stream", "multipart/form-data; boundary=x",
                 "application/json; charset=utf-16", "application/x-www-form-urlencoded", "\u00e9/json"]


def body_case(rng: random.Random, index: int) -> Case:
    maker = BODY_MAKERS[index % len(BODY_MAKERS)]
    content_type = "application/json" if rng.random() < 0.7 else rng.choice(CONTENT_TYPES)
    method = "POST" if rng.random() < 0.9 else rng.choice(["PUT", "PATCH", "DELETE"])
    return Case(f"body:{maker.__name__}", method=method, path=rng.choice(JSON_ROUTES), body=maker(rng),
                content_type=content_type)


# Heads, headers, targets ------------------------------------------------------------------------------------

def _request(method: str = "POST", target: str | bytes = "/v1/chat/completions", headers: list[bytes] | None = None,
             body: bytes | None = None, version: bytes = b"HTTP/1.1", close: bool = True) -> bytes:
    if body is None:
        body = json.dumps(VALID_CHAT).encode() if method == "POST" else b""
    lines = [method.encode("latin-1") + b" " + (target if isinstance(target, bytes) else target.encode()) + b" "
             + version, b"Host: fuzz"]
    if headers is None or not any(h.lower().startswith((b"content-length", b"transfer-encoding")) for h in headers):
        lines.append(b"Content-Length: %d" % len(body))
    lines += headers or []
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _hostile_header(rng: random.Random) -> tuple[str, bytes]:
    size = rng.choice([100, 8000, 8190, 9000, 70_000])
    kinds: dict[str, Callable[[], bytes]] = {
        "huge": lambda: _request(headers=[b"X-Big: " + b"a" * size]),
        "many": lambda: _request(headers=[b"X-H%d: v" % i for i in range(rng.choice([50, 129, 1000]))]),
        "dup-cl-same": lambda: _request(body=b"{}", headers=[b"Content-Length: 2", b"Content-Length: 2"]),
        "dup-cl-diff": lambda: _request(body=b"{}", headers=[b"Content-Length: 2", b"Content-Length: 3"]),
        "cl-and-te": lambda: _request(body=b"2\r\n{}\r\n0\r\n\r\n",
                                      headers=[b"Content-Length: 4", b"Transfer-Encoding: chunked"]),
        "te-bad-size": lambda: _request(body=rng.choice([b"zz\r\n{}\r\n0\r\n\r\n", b"-1\r\n{}\r\n0\r\n\r\n",
                                                         b"ffffffffffffffffffff\r\n{}", b"2;\x00\r\n{}\r\n0\r\n\r\n",
                                                         b"2\r\n{}", b"2\r\n{}XX0\r\n\r\n"]),
                                        headers=[b"Transfer-Encoding: chunked"]),
        "te-odd": lambda: _request(body=b"2\r\n{}\r\n0\r\n\r\n", headers=[rng.choice([
            b"Transfer-Encoding: chunked, chunked", b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: identity",
            b"Transfer-Encoding: xchunked", b"Transfer-Encoding:  chunked", b"Transfer-Encoding : chunked",
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"Transfer-Encoding: \x0bchunked"])]),
        "cl-odd": lambda: _request(body=b"{}", headers=[b"Content-Length: " + rng.choice([
            b"-1", b"+2", b"1e3", b"  2", b"2, 2", b"0x2", b"99999999999999999999", b"", b"2 2", b"\xd9\xa2"])]),
        "crlf": lambda: rng.choice([
            _request(headers=[b"X-A: a\rX-B: b"]), _request(headers=[b"X-A: a\nX-Injected: b"]),
            _request(headers=[b"X-A: a\r\r\n"]), _request().replace(b"\r\n", b"\n"),
            _request(headers=[b"X-A: a\x00b"])]),
        "non-ascii": lambda: _request(headers=[rng.choice([
            "X-\u00e9: v".encode(), b"X-A: \xe9\xff", "X-A: \u00e9\u4e2d".encode(), b"\xff\xfe: v",
            "X-Request-ID: \u4e2d".encode()])]),
        "malformed-line": lambda: _request(headers=[rng.choice([
            b"NoColon", b": empty-name", b" X-Folded: v", b"X-A : v", b"X-A:\tv", b"X-A\x7f: v", b"\tcontinued"])]),
        "request-id": lambda: _request(headers=[b"X-Request-ID: " + rng.choice([
            b"r" * 10_000, b"a\x7fb", b"\xe9", b"", b"x" * 129])]),
        "host": lambda: _request(headers=[rng.choice([b"Host: evil.example:99999", b"Host: a\r\nHost: b",
                                                      b"Host: ", b"Host: [::1"])]),
        "expect": lambda: _request(headers=[rng.choice([
            b"Expect: 100-continue", b"Expect: foo", b"Expect: 100-continue\r\nContent-Length: 99999999"])]),
        "upgrade": lambda: _request(headers=[b"Connection: Upgrade", rng.choice([
            b"Upgrade: websocket", b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__"])], close=False),
        "encoding": lambda: _request(headers=[rng.choice([b"Content-Encoding: gzip", b"Content-Encoding: br",
                                                          b"Content-Encoding: deflate, gzip"])]),
        "forwarded": lambda: _request(headers=[b"X-Forwarded-For: " + b"1.2.3.4, " * rng.choice([1, 1000])]),
    }
    name = rng.choice(sorted(kinds))
    return f"header:{name}", kinds[name]()


TARGETS: list[str | bytes] = [
    "http://x/slots", "https://x:1/v1/models?a=b", "ftp://a/b", "http://", "http://x", "http://[::1]/health",
    "HTTP://X/health", "*", "x:443", "/../../etc/passwd", "/v1/../health", "/%2e%2e/%2e%2e/", "/%00", "/%",
    "/%zz", "/a%00b", "/health%00", "//", "///x", "/\\..\\", "/?" + "x" * 8000, "/" + "a" * 8180, "/" + "a" * 9000,
    "/" + "a" * 70_000, b"/\xc3\xa9", b"/\xff", "/#frag", "/a\tb", "/health?x=1", "/%68ealth", "/admin/../health",
    "/llmhealth/../v1/models", "/v1/models%2f..", "http://x/admin/instances", "/v1/chat/completions?stream=true",
]


def _hostile_target(rng: random.Random) -> tuple[str, bytes]:
    if rng.random() < 0.3:
        path = rng.choice(OWN_PATHS)
        method = rng.choice(METHODS)
        return f"own:{method[:10]} {path}", _request(method, path, body=b"{}" if rng.random() < 0.5 else b"")
    target = rng.choice(TARGETS)
    method = rng.choice(METHODS) if rng.random() < 0.4 else "GET"
    shown = target if isinstance(target, str) else target.decode("latin-1")
    return f"target:{method[:10]} {shown[:40]}", _request(method, target, body=b"")


def _hostile_protocol(rng: random.Random) -> tuple[str, bytes]:
    valid = _request("GET", "/v1/models", body=b"", close=False)
    choices: dict[str, bytes] = {
        "http/0.9": b"GET /\r\n",
        "http/0.9-blank": b"GET /\r\n\r\n",
        "http/2.0": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
        "http/1.2": b"GET / HTTP/1.2\r\nHost: x\r\nConnection: close\r\n\r\n",
        "http/3": b"GET / HTTP/3\r\n\r\n",
        "lowercase": b"GET / http/1.1\r\nHost: x\r\n\r\n",
        "extra-token": b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        "double-space": b"GET  /health  HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "leading-blank-lines": b"\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "tls-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(rng.getrandbits(8) for _ in range(64)),
        "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "garbage": bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))),
        "crlf-only": b"\r\n" * rng.randint(1, 100),
        "pipelined": valid + b"GARBAGE / HTTP/1.1\r\n\r\n" + valid,
        "pipelined-ok": valid + valid + _request("GET", "/health", body=b""),
        "partial-head": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
        "partial-body": _request()[:-10],
        "http/1.0": b"GET /health HTTP/1.0\r\n\r\n",
        "http/1.0-body": b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n\r\n"
        + json.dumps(VALID_CHAT).encode(),
        "absolute-post": _request("POST", "http://evil.example/v1/chat/completions"),
        "nul-request-line": b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        "long-method": b"A" * 9000 + b" / HTTP/1.1\r\n\r\n",
    }
    name = rng.choice(sorted(choices))
    return f"protocol:{name}", choices[name]


def raw_case(rng: random.Random, index: int) -> Case:
    maker = [_hostile_header, _hostile_target, _hostile_protocol][index % 3]
    name, raw = maker(rng)
    return Case(name, raw=raw)


def corpus() -> list[Case]:
    rng = random.Random(SEED)
    return [raw_case(rng, i) for i in range(RAW_CASES)] + [body_case(rng, i) for i in range(BODY_CASES)]


# Running it -------------------------------------------------------------------------------------------------

def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _judge(case: Case, status: int, headers: dict[str, str], body: bytes) -> str | None:
    """What is wrong with this answer, if anything."""
    if status < 500:
        return None
    code = None
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        code = json.loads(body)["error"]["code"]
    relayed = headers.get("server") == "llama.cpp"  # the fake's own answer, passed on
    if code == "internal_error" or not (relayed or code in UPSTREAM_CODES):
        return f"{case.name}: {status} {body[:200]!r}"
    return None


async def _raw(port: int, case: Case) -> str | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        writer.write(case.raw)
        if case.name == "protocol:partial-head" or case.name == "protocol:partial-body":
            await asyncio.sleep(0.05)
            writer.close()  # the client gives up half-way
            return None
        async with asyncio.timeout(6.0):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    received += chunk
    except TimeoutError:
        return f"{case.name}: no end to the exchange within 6 s (got {bytes(received[:100])!r})"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    data = bytes(received)
    # Every response on the connection (pipelining, 100 Continue) is judged by its status line and body.
    problems = []
    for part in data.split(b"HTTP/1.")[1:]:
        head, _, body = part.partition(b"\r\n\r\n")
        with contextlib.suppress(ValueError, IndexError):
            status = int(head[2:5])
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            problem = _judge(case, status, headers, body)
            if problem:
                problems.append(problem)
    return "; ".join(problems) or None


async def _through_aiohttp(session: aiohttp.ClientSession, url: str, case: Case) -> str | None:
    headers = {"Content-Type": case.content_type} if case.content_type else {}
    try:
        # A large body as a file: aiohttp warns about big raw bytes (and warnings are errors here).
        data = io.BytesIO(case.body) if len(case.body) > 65536 else case.body
        async with asyncio.timeout(10.0), session.request(
            case.method, url + case.path, data=data, headers=headers
        ) as reply:
            body = await reply.read()
            return _judge(case, reply.status, {k.lower(): v for k, v in reply.headers.items()}, body)
    except TimeoutError:
        return f"{case.name}: no answer within 10 s"
    except aiohttp.ClientError as exc:
        return f"{case.name}: {exc!r}"


async def test_hostile_requests_never_get_our_own_500_nor_kill_nor_bloat_the_daemon(tmp_path: Path) -> None:
    cases = corpus()
    async with run_fake_llama() as fake:
        port = free_port()
        log_path = tmp_path / "balancer.log"
        env = {
            **os.environ, "LLMBALANCER_LOG_FORMAT": "json", "LLMBALANCER_LOG_LEVEL": "warning",
            "LLMBALANCER_SERVER__HEADER_TIMEOUT": "1", "LLMBALANCER_SERVER__BODY_TIMEOUT": "1",
            "LLMBALANCER_SERVER__KEEPALIVE_TIMEOUT": "1", "LLMBALANCER_SERVER__MAX_BODY_BYTES": str(MAX_BODY),
            "LLMBALANCER_TIMEOUTS__FIRST_BYTE": "5",
        }
        with log_path.open("wb") as log:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llmbalancer", "serve", "--backend", fake.url, "--port", str(port),
                "--policy", "sticky:prefix", cwd=REPO, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as session:
                await _until_healthy(session, url, child)
                for _ in range(50):  # warm-up: what every request allocates once, before the baseline
                    async with session.post(url + "/v1/chat/completions", json=VALID_CHAT) as reply:
                        assert reply.status == 200
                baseline = _rss(child.pid)
                started = time.monotonic()
                limit = asyncio.Semaphore(12)

                async def run(case: Case) -> str | None:
                    async with limit:
                        if case.raw:
                            return await _raw(port, case)
                        return await _through_aiohttp(session, url, case)

                problems = [p for p in await asyncio.gather(*(run(c) for c in cases)) if p]
                elapsed = time.monotonic() - started
                assert child.returncode is None, "the balancer died"
                for path in ("/health", "/metrics", "/llmhealth-snapshot", "/llmhealth", "/v1/models"):
                    async with session.get(url + path) as reply:  # what the corpus left behind still renders
                        assert reply.status == 200, (path, await reply.text())
                async with session.post(url + "/v1/chat/completions", json=VALID_CHAT) as reply:
                    assert reply.status == 200
                growth = _rss(child.pid) - baseline
        finally:
            if child.returncode is None:
                child.terminate()
            try:
                await asyncio.wait_for(child.wait(), 15)
            except TimeoutError:
                child.kill()
                await child.wait()
    log_text = log_path.read_text(errors="replace")
    assert not problems, "\n".join(problems)
    assert "unhandled_error" not in log_text and "Traceback" not in log_text, log_text[-5000:]
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert elapsed < 60, f"the corpus took {elapsed:.1f} s"


async def _until_healthy(session: aiohttp.ClientSession, url: str, child: asyncio.subprocess.Process) -> None:
    for _ in range(300):
        assert child.returncode is None, "the balancer exited at start-up"
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with session.get(url + "/health") as reply:
                if reply.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise TimeoutError("the balancer did not come up")
