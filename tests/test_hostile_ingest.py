"""Hostile input against ingest (issue #9): it must answer 4xx, never 5xx or a crash, and publish nothing
for an unauthenticated request.

ingest runs in-process (aiohttp's test server, ``tests.ingest_support.running_ingest``) against the real
broker. Every request is recorded by kind in ``TRIED``; the counts go to ``build/reliability/report.json``
and to the pytest terminal summary. After each group of requests the server must still answer
``/healthz`` and accept a valid event, and the raw and dead-letter topics' end offsets prove what was (not)
published.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import random
import statistics
import string
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.auth import Authenticator
from ingest.config import resolve_destinations
from tests.ingest_support import (
    TOKEN_GROUP,
    TOKEN_PROD,
    TOKEN_PROD_NEXT,
    Ingest,
    make_config,
    running_ingest,
    seed_payloads,
)
from tests.reliability_support import TOKEN_HEADER, end_offsets, publish

SEEDS = seed_payloads()
VALID = SEEDS["user_impersonation"]

# kind -> Counter(status) of every hostile request sent by this module.
TRIED: dict[str, Counter[str]] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _report_hostile_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if TRIED:
        totals = {kind: sum(c.values()) for kind, c in sorted(TRIED.items())}
        data = {"by_kind": totals, "statuses": {k: dict(sorted(c.items())) for k, c in sorted(TRIED.items())},
                "total": sum(totals.values())}
        line = f"hostile requests: total={data['total']} " + " ".join(f"{k}={n}" for k, n in totals.items())
        publish(request.config, "hostile", "ingest", data, line)


def note(kind: str, status: int | str | None) -> None:
    TRIED[kind][str(status)] += 1


def check(kind: str, status: int | None, allowed: set[int | None], what: str) -> None:
    note(kind, status)
    assert status is None or status < 500, f"{kind}: {what}: answered {status}"
    assert status in allowed, f"{kind}: {what}: answered {status}, expected one of {sorted(allowed, key=str)}"


class Topics:
    def __init__(self, raw: str, dlq: str) -> None:
        self.raw, self.dlq = raw, dlq


@pytest.fixture
def topics(topic: Callable[..., str]) -> Topics:
    return Topics(raw=topic(1), dlq=topic(1))


async def offsets(bootstrap: str, topics: Topics) -> tuple[int, int]:
    raw = await end_offsets(bootstrap, topics.raw)
    dlq = await end_offsets(bootstrap, topics.dlq)
    return sum(raw.values()), sum(dlq.values())


def fresh_event() -> bytes:
    """A valid event with an id of its own (so that ingest's duplicate window lets it through)."""
    event = json.loads(VALID)
    event["id"] = time.time_ns()
    return json.dumps(event).encode()


async def still_serving(ingest: Ingest) -> None:
    """/healthz answers and a valid event is accepted (200) right after the abuse."""
    response = await ingest.client.get("/healthz")
    assert response.status == 200
    status, text, _ = await ingest.post(fresh_event())
    assert status == 200, text


# --- raw HTTP -----------------------------------------------------------------------------------------


async def raw_request(port: int, data: bytes, *, read_timeout: float = 10.0) -> tuple[int | None, bytes]:
    """Send ``data`` as is; (status of the answer or None when the connection closed without one, answer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        answer = b""
        try:
            async with asyncio.timeout(read_timeout):
                while b"\r\n\r\n" not in answer:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    answer += chunk
        except (ConnectionError, OSError):
            pass
        return parse_status(answer), answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def parse_status(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def head(path: str = "/", *, token: str | None = TOKEN_PROD, length: int | None = None,
         extra: list[str] | None = None, method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: ingest", "Content-Type: application/x-www-form-urlencoded"]
    if token is not None:
        lines.append(f"{TOKEN_HEADER}: {token}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += extra or []
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- tokens ---------------------------------------------------------------------------------------------


def _flip(text: str, index: int) -> str:
    alphabet = string.ascii_letters + string.digits
    replacement = next(c for c in alphabet if c != text[index])
    return text[:index] + replacement + text[index + 1 :]


def wrong_tokens() -> dict[str, list[str | None]]:
    rng = random.Random(9)
    alphabet = string.ascii_letters + string.digits + "+/"
    cases: dict[str, list[str | None]] = {
        "token_missing": [None],
        "token_empty": ["", " ", "\t"],
        "token_wrong": ["".join(rng.choice(alphabet) for _ in range(len(TOKEN_PROD))) for _ in range(5)]
        + ["wrong-token-0123456789", TOKEN_PROD.lower(), TOKEN_PROD.upper(), TOKEN_PROD[::-1]],
        "token_last_char_differs": [_flip(t, -1) for t in (TOKEN_PROD, TOKEN_PROD_NEXT, TOKEN_GROUP)],
        "token_first_char_differs": [_flip(t, 0) for t in (TOKEN_PROD, TOKEN_PROD_NEXT, TOKEN_GROUP)],
        "token_prefix_or_extended": [TOKEN_PROD[:-1], TOKEN_PROD[:16], TOKEN_PROD + "x",
                                     TOKEN_PROD + TOKEN_PROD, TOKEN_PROD + "," + TOKEN_GROUP,
                                     TOKEN_PROD_NEXT[:-2]],
        "token_over_long": ["A" * 600, TOKEN_PROD + "A" * 4000, "z" * 8000],
        "token_non_ascii": ["prodToken0123456789äb", "ⓟrodToken0123456789ab", "\u00a0" + TOKEN_PROD],
    }
    return cases


async def test_unauthenticated_requests_are_refused_and_publish_nothing(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    config = make_config(tmp_path, bootstrap=kafka_bootstrap, topic=topics.raw, dlq_topic=topics.dlq,
                         max_body_bytes=64 * 1024)
    async with running_ingest(config) as ingest:
        port = ingest.client.server.port
        await still_serving(ingest)  # the topics are written to: offsets below are meaningful
        before = await offsets(kafka_bootstrap, topics)
        unauthenticated = 0
        for kind, tokens in wrong_tokens().items():
            for token in tokens:
                # Bad bodies too: a refused sender's body is never read, let alone dead-lettered.
                for body in (VALID, b"not json", b"[1,2]"):
                    if token is not None and not token.isascii():
                        # aiohttp's client refuses to send it; the raw request carries the UTF-8 bytes.
                        line = TOKEN_HEADER.encode() + b": " + token.encode()
                        data = head(token=None, length=len(body)).replace(
                            b"\r\n\r\n", b"\r\n" + line + b"\r\n\r\n", 1
                        ) + body
                        status, _ = await raw_request(port, data)
                    else:
                        status, _, _ = await ingest.post(body, token=token)
                    check(kind, status, {401}, repr(token)[:40])
                    unauthenticated += 1
        # Tokens somewhere else than the one header GitLab uses.
        elsewhere = [
            ("/?token=" + TOKEN_PROD, {"Authorization": f"Bearer {TOKEN_PROD}"}),
            ("/", {"X-Gitlab-Token": TOKEN_PROD}),
            ("/" + TOKEN_PROD, {"Cookie": f"token={TOKEN_PROD}"}),
            ("/", {"X-Gitlab-Event-Streaming-Token-": TOKEN_PROD}),
        ]
        for path, headers in elsewhere:
            status, _, _ = await ingest.post(VALID, token=None, path=path, headers=headers)
            check("token_elsewhere", status, {401}, f"{path} {list(headers)}")
            unauthenticated += 1
        # A large body without a token: refused at once, without reading it.
        started = time.monotonic()
        status, _, _ = await ingest.post(b'{"pad":"' + b"x" * 60_000 + b'"}', token="nope-nope-nope-nope")
        check("token_wrong", status, {401}, "large body")
        assert time.monotonic() - started < 5
        unauthenticated += 1
        # A header line too long for the server: refused before authentication (and nothing published).
        status, _ = await raw_request(port, head(token="T" * 20_000, length=len(VALID)) + VALID)
        check("token_over_long", status, {400, 431, None}, "20 kB token")
        await still_serving(ingest)
        metrics = await (await ingest.client.get("/metrics")).text()
    after = await offsets(kafka_bootstrap, topics)
    # Exactly the two probes of still_serving() reached the raw topic; nothing reached the DLQ.
    assert after == (before[0] + 1, before[1]), (before, after)
    series = 'falco_gitlab_ingest_requests_total{destination="unauthenticated",status="401"}'
    refused = next(line for line in metrics.splitlines() if line.startswith(series))
    assert int(float(refused.rsplit(" ", 1)[1])) == unauthenticated


# --- timing of the token comparison -------------------------------------------------------------------


def _median_ns_per_call(auth: Callable[[str], Any], candidates: dict[str, str], rounds: int,
                        inner: int) -> dict[str, float]:
    """Interleaved measurements: each round times every candidate once, in a shuffled order."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    rng = random.Random(1)
    names = list(candidates)
    clock = time.thread_time_ns  # CPU time of this thread: other processes on the machine do not count
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            value = candidates[name]
            start = clock()
            for _ in range(inner):
                auth(value)
            samples[name].append((clock() - start) / inner)
    return {name: statistics.median(values) for name, values in samples.items()}


def test_token_comparison_time_does_not_depend_on_how_much_matches(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    config = make_config(tmp_path)
    authenticator = Authenticator(resolve_destinations(config))
    token = TOKEN_PROD
    n = len(token)
    other = "".join("x" if c != "x" else "y" for c in token)  # differs in every position
    candidates = {
        f"0 of {n}": other,
        "half": token[: n // 2] + other[n // 2 :],
        "all but last": token[:-1] + other[-1],
        "all (valid)": token,
    }
    assert authenticator.authenticate(token) is not None
    assert all(authenticator.authenticate(c) is None for k, c in candidates.items() if k != "all (valid)")
    medians = _median_ns_per_call(authenticator.authenticate, candidates, rounds=101, inner=200)
    spread = max(medians.values()) / min(medians.values())

    # The method must be able to see a leak: an early-exit comparison of the same candidates.
    def leaky(value: str) -> bool:
        if len(value) != n:
            return False
        return all(a == b for a, b in zip(value, token, strict=True))

    leaky_medians = _median_ns_per_call(leaky, candidates, rounds=101, inner=200)
    leak = leaky_medians["all but last"] / leaky_medians[f"0 of {n}"]
    line = (f"token timing: median ns/call {({k: round(v) for k, v in medians.items()})}, "
            f"spread {spread:.3f}; early-exit reference ratio {leak:.2f}")
    publish(request.config, "hostile", "token_timing",
            {"median_ns_per_call": medians, "spread": spread, "early_exit_reference_ratio": leak,
             "calls": 101 * 200 * len(candidates)}, line)
    assert leak > 1.5, f"the measurement cannot see an obvious leak: {leaky_medians}"
    # Generous: the implementation hashes with a keyed digest and compares fixed-length digests.
    assert spread < 1.25, f"comparison time depends on the candidate: {medians}"


# --- malformed bodies from an authenticated sender ---------------------------------------------------


def nested(depth: int, opener: bytes = b"[", closer: bytes = b"]") -> bytes:
    return opener * depth + closer * depth


def malformed_bodies() -> dict[str, list[bytes]]:
    return {
        "body_not_json": [b"hello", b"{", b"}", b"id=1&event_type=user_impersonation", b"<xml/>",
                          b"\x00\x01\x02",
                          b'{"id": 1,}', b"{'id': 1}", b'{"id": NaN, "event_type": "x"}',
                          b'{"id": Infinity}', b"\xef\xbb\xbf" + VALID, b'{"a":1}{"b":2}', b"[{}] x"],
        "body_invalid_utf8": [b'{"id":1,"author_name":"\xff\xfe"}', b'{"id":1,"x":"\xc0\xaf"}',
                              b'{"id":1,"x":"\xed\xa0\x80"}', b'{"id":1,"x":"\xf4\x90\x80\x80"}',
                              b'[{"id":1},{"x":"\x80"}]', b'{"id":"\\ud800"}'],
        "body_deeply_nested": [nested(100_000), b'{"details":' + nested(100_000) + b"}",
                               b'{"x":' + nested(30_000, b'{"a":', b"}")[:-30_000] + b"1" + b"}" * 30_001,
                               b"[" + b'{"details":' + nested(5_000) + b"}]",
                               b'{"id":' + nested(2_000) + b"}",
                               nested(100_000, b"[", b"")],
        "body_truncated": [VALID[: len(VALID) // 2], VALID[:-2], b'[{"id":1},{"id":2}', b'{"id":"abc'],
        "body_array_of_non_objects": [b"[1,2,3]", b'["a"]', b"[null]", b"[[]]", b'[{"id":1},2]', b"[true]",
                                      b"[]", b"[ ]", b'[{"id":1},[{"id":2}]]'],
        "body_scalar": [b"1", b'"event"', b"null", b"true", b"-0.5e3"],
        "body_empty": [b"", b"   ", b"\r\n"],
    }


async def test_malformed_bodies_are_refused_with_4xx_and_only_dead_lettered(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    limit = 256 * 1024
    config = make_config(tmp_path, bootstrap=kafka_bootstrap, topic=topics.raw, dlq_topic=topics.dlq,
                         max_body_bytes=limit)
    config.kafka.dlq_max_bytes = 4096
    async with running_ingest(config) as ingest:
        port = ingest.client.server.port
        await still_serving(ingest)
        before = await offsets(kafka_bootstrap, topics)
        dead_letters = 0
        for kind, bodies in malformed_bodies().items():
            for body in bodies:
                status, text, _ = await ingest.post(body)
                check(kind, status, {400}, f"{body[:40]!r}... ({len(body)} bytes): {text.strip()[:200]}")
                dead_letters += 1 if body.strip() else 0
        # Huge bodies: 413, announced or not, and never read in full.
        huge = b'{"id":1,"pad":"' + b"x" * (4 * limit) + b'"}'
        status, _, _ = await ingest.post(huge)
        check("body_huge", status, {413}, "Content-Length 4x the limit")
        dead_letters += 1

        async def chunks() -> Any:
            for _ in range(8):
                yield b"x" * limit

        async with ingest.client.post("/", data=chunks(), headers={TOKEN_HEADER: TOKEN_PROD}) as response:
            check("body_huge", response.status, {413}, "chunked, no Content-Length")
        dead_letters += 1
        # Claims 10 GB, sends a few bytes: refused at once.
        started = time.monotonic()
        status, _ = await raw_request(port, head(length=10 * 1024**3) + b'{"id":1}')
        check("body_huge", status, {413}, "Content-Length 10 GB")
        assert time.monotonic() - started < 5
        dead_letters += 1
        # A gzip bomb: ingest never decompresses (100 MB of zeros in ~100 kB).
        bomb = gzip.compress(b"\0" * 100_000_000, compresslevel=9)
        status, _, _ = await ingest.post(bomb, headers={"Content-Encoding": "gzip"})
        check("body_compressed_bomb", status, {400, 413}, f"{len(bomb)} bytes of gzip")
        dead_letters += 1
        # Announced longer than sent, then the client goes away: nothing to answer, nothing published.
        status, _ = await raw_request(port, head(length=5000) + VALID[:100], read_timeout=0.5)
        check("body_truncated", status, {None, 400}, "connection closed mid-body")
        await still_serving(ingest)
        # Wait for the dead letters of the closed connection (if any) to settle before counting.
        await asyncio.sleep(1.0)
    after = await offsets(kafka_bootstrap, topics)
    assert after[0] == before[0] + 1, "a malformed body reached the raw topic"
    # Every refused non-empty body is dead-lettered (the connection closed mid-body may add one).
    assert dead_letters <= after[1] - before[1] <= dead_letters + 1, (before, after, dead_letters)


# --- HTTP protocol abuse --------------------------------------------------------------------------------


async def test_protocol_abuse_is_refused_with_4xx(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    config = make_config(tmp_path, bootstrap=kafka_bootstrap, topic=topics.raw, dlq_topic=topics.dlq)
    async with running_ingest(config) as ingest:
        port = ingest.client.server.port
        await still_serving(ingest)
        before = await offsets(kafka_bootstrap, topics)
        body = VALID
        cases: dict[str, list[tuple[bytes, set[int | None]]]] = {
            "header_oversized": [
                (head(length=len(body), extra=["X-Padding: " + "p" * 20_000]) + body, {400, 431}),
                (head(token=None, length=len(body), extra=["X-Padding: " + "p" * 9000]) + body, {400, 431}),
                (head(length=len(body), extra=["X-" + "n" * 9000 + ": v"]) + body, {400, 431}),
            ],
            "header_too_many": [
                (head(length=len(body), extra=[f"X-H{i}: v" for i in range(200)]) + body, {400, 431}),
            ],
            "request_line_too_long": [(head("/" + "a" * 20_000, length=len(body)) + body, {400, 414, 431})],
            "request_smuggling": [
                (head(length=len(body), extra=["Transfer-Encoding: chunked"]) + b"0\r\n\r\n", {400}),
                (head(length=len(body), extra=[f"Content-Length: {len(body) + 1}"]) + body, {400}),
                (head(extra=["Transfer-Encoding: gzip, chunked"]) + b"0\r\n\r\n", {400, 501}),
            ],
            "header_malformed": [
                (head(length=len(body), extra=["X-Bad\x00: v"]) + body, {400}),
                (head(length=len(body), extra=["Bad Header: v"]) + body, {400}),
                (head(length=len(body), extra=[" folded-continuation"]) + body, {400}),
                (head(extra=["Content-Length: -5"]) + body, {400}),
                (head(extra=["Content-Length: abc"]) + body, {400}),
                (b"GARBAGE\r\n\r\n", {400}),
                (b"POST / HTTP/9.9\r\nHost: x\r\n\r\n", {400, 505}),
                (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), {400}),  # a TLS hello
            ],
            "method_not_allowed": [
                (head(method="GET", token=TOKEN_PROD), {405}),
                (head(method="PUT", length=len(body)) + body, {405}),
                (head(method="DELETE", token=None), {405}),
            ],
        }
        for kind, requests in cases.items():
            for data, allowed in requests:
                status, answer = await raw_request(port, data)
                check(kind, status, allowed, f"{data[:60]!r}: {answer[:80]!r}")
        await still_serving(ingest)
    after = await offsets(kafka_bootstrap, topics)
    assert after == (before[0] + 1, before[1]), (before, after)


# --- slow clients ---------------------------------------------------------------------------------------


async def _dribble(
    port: int, first: bytes, drip: bytes, interval: float, limit_s: float
) -> tuple[float, bytes]:
    """Send ``first``, then ``drip`` every ``interval`` s until the server answers or closes (or
    ``limit_s``); (seconds until then, what it answered)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    answer = b""
    try:
        writer.write(first)
        await writer.drain()
        while time.monotonic() - started < limit_s:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), interval)
            except TimeoutError:
                try:
                    writer.write(drip)
                    await writer.drain()
                except (ConnectionError, OSError):
                    break
                continue
            except (ConnectionError, OSError):
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                break
        return time.monotonic() - started, answer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def test_slow_clients_are_timed_out_while_others_are_served(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    idle, body_timeout = 2.0, 1.5
    config = make_config(tmp_path, bootstrap=kafka_bootstrap, topic=topics.raw, dlq_topic=topics.dlq,
                         body_timeout_s=body_timeout)
    config.server.idle_timeout_s = idle
    async with running_ingest(config) as ingest:
        port = ingest.client.server.port
        await still_serving(ingest)
        before = await offsets(kafka_bootstrap, topics)
        head_slow = [  # the request head never completes: a header line every 0.3 s
            _dribble(port, b"POST / HTTP/1.1\r\nHost: x\r\n", b"X-Slow: a\r\n", 0.3, 15) for _ in range(15)
        ]
        silent = [_dribble(port, b"", b"", 30, 15) for _ in range(5)]  # connects, sends nothing
        partial = [_dribble(port, b"POST / HT", b"", 30, 15) for _ in range(5)]
        body_slow = [  # authenticated: a body byte every 0.3 s
            _dribble(port, head(length=len(VALID)) + VALID[:1], b" ", 0.3, 15) for _ in range(5)
        ]
        body_slow_unauth = [
            _dribble(port, head(token=None, length=len(VALID)) + VALID[:1], b" ", 0.3, 15) for _ in range(5)
        ]
        tasks = {
            "slowloris_head": [asyncio.create_task(c) for c in head_slow],
            "slowloris_idle_connection": [asyncio.create_task(c) for c in silent + partial],
            "slowloris_body": [asyncio.create_task(c) for c in body_slow],
            "slowloris_body_unauthenticated": [asyncio.create_task(c) for c in body_slow_unauth],
        }
        # Meanwhile a legitimate sender is served promptly.
        served = []
        for _ in range(10):
            started = time.monotonic()
            status, _, _ = await ingest.post(fresh_event())
            served.append((status, time.monotonic() - started))
            await asyncio.sleep(0.2)
        results = {kind: await asyncio.gather(*group) for kind, group in tasks.items()}
        await still_serving(ingest)
    assert all(status == 200 for status, _ in served), served
    assert max(took for _, took in served) < 2.0, served
    margin = 1.5  # scheduling on a loaded 2-core machine
    for kind, outcomes in results.items():
        for took, answer in outcomes:
            status = parse_status(answer)
            note(kind, status if status is not None else "closed")
            if kind in ("slowloris_head", "slowloris_idle_connection"):
                assert status in (None, 400, 408), (kind, answer[:80])
                assert took < idle + margin, f"{kind}: connection held {took:.1f} s (idle timeout {idle} s)"
            elif kind == "slowloris_body":
                assert status == 408, (kind, answer[:80])
                assert took < body_timeout + margin, f"{kind}: {took:.1f} s (body timeout {body_timeout} s)"
            else:
                assert status == 401, (kind, answer[:80])
                assert took < margin, f"{kind}: {took:.1f} s"
    after = await offsets(kafka_bootstrap, topics)
    # The probes reached the raw topic; each authenticated slow body is dead-lettered ("timeout").
    assert after[0] == before[0] + len(served) + 1
    assert after[1] == before[1] + len(body_slow)


# --- the body splitter alone ----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    nested(100_000), b'{"details":' + nested(100_000) + b"}", b'{"x":' + nested(3_000) + b"}",
    b"[" + b'{"id":' + nested(100_000, b'{"a":', b"}")[:-100_000] + b"1" + b"}" * 100_001 + b"]",
    b"[" + nested(10_000) + b"]",
], ids=["array", "details", "unknown-key", "object-in-array", "array-in-array"])
def test_deeply_nested_json_is_a_body_error_not_a_crash(body: bytes) -> None:
    """msgspec raises RecursionError beyond its depth limit; ingest must turn it into a 400 (BodyError)."""
    from ingest.body import BodyError, split_body

    with pytest.raises(BodyError, match="nested too deeply"):
        split_body(body)
