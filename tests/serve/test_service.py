"""dlkit serve tested as a service, against a real uvicorn process on a free loopback port (started
here, stopped by PID): schema-based fuzzing (no 5xx), hostile uploads (each a quick 4xx, memory
bounded) and a bounded load test (10,000 requests at concurrency 32, no errors, the solo answers)."""
from __future__ import annotations

import asyncio
import io
import json
import select
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode

DIGITS, TABLE, TEXT = "digits-cnn", "breast-cancer-lstm", "tiny-text-lstm"
MIB = 1024 * 1024


@dataclass
class Server:
    """A `dlkit serve` process: its base URL, PID and log."""

    base: str
    pid: int
    log: Path

    def rss_mb(self) -> float:
        """Resident memory now (VmRSS), in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for {self.pid}")


@pytest.fixture(scope="module")
def server(runs, serving, tmp_path_factory) -> Iterator[Server]:
    """`python -m dlkit serve` over the three runs (torch backend), ready; stopped by PID afterwards."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving([*(str(runs[n]) for n in (DIGITS, TABLE, TEXT)), "--backend", "torch"], log) as (base, proc):
        yield Server(base, proc.pid, log)
    assert "Traceback" not in log.read_text(), log.read_text()


def assert_error_body(r: httpx.Response | object, what: str) -> None:
    """A 4xx carries exactly {"error": one line}."""
    body = r.json()
    assert isinstance(body, dict) and list(body) == ["error"] and isinstance(body["error"], str), (what, body)


# ---- schema-based fuzzing ---------------------------------------------------------------------------

FUZZ_CASES = 1200


def test_fuzzed_requests_from_the_openapi_schema_never_get_a_5xx(server):
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json")
    # each operation as the schema allows it and as it does not, with model names drawn at random and
    # set to the three real models (a random name only ever meets the 404)
    strategies = [schema.as_strategy(mode, path_parameters=names)
                  for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
                  for names in (None, {"name": DIGITS}, {"name": TABLE}, {"name": TEXT})]
    seen: Counter[tuple[str, int]] = Counter()
    deadline = time.monotonic() + 120

    @settings(max_examples=FUZZ_CASES, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(strategies))
    def fuzz(case) -> None:
        if time.monotonic() > deadline:
            return  # bounded in time as well as count; the count is asserted below
        r = case.call(base_url=server.base, timeout=10)
        seen[(f"{case.method} {case.operation.path}", r.status_code)] += 1
        assert r.status_code < 500, (case.as_curl_command(), r.status_code, r.text[:500], server.log.read_text()[-3000:])
        if r.status_code >= 400:
            assert_error_body(r, case.as_curl_command())

    fuzz()
    by_status = Counter(status for (_, status), n in seen.items() for _ in range(n))
    print(f"fuzzing: {sum(seen.values())} cases, statuses {dict(sorted(by_status.items()))}")
    assert sum(seen.values()) >= 1000, seen
    operations = {op for op, _ in seen}
    assert {"GET /health", "GET /ready", "GET /metrics", "GET /v1/models", "POST /v1/models/{name}/predict",
            "POST /v1/models/{name}/explain"} <= operations, seen
    assert any(op.startswith("POST") and status == 200 for op, status in seen), seen  # some were answered


# ---- hostile uploads ----------------------------------------------------------------------------------

def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (and no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def raw_request(port: int, head: bytes, body_chunks: Iterator[bytes], *, limit: int) -> tuple[bytes, int]:
    """Send `head`, then body chunks until the server answers (or `limit` bytes went); the answer's bytes
    and how many body bytes were sent before it came."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0] or sent >= limit:
                break
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed its side after answering
            sent += len(chunk)
        answer = b""
        s.settimeout(1)
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except (TimeoutError, ConnectionResetError):
            pass
    return answer, sent


def test_hostile_uploads_are_quick_4xx_and_memory_stays_bounded(server, digit_files):
    jpeg = io.BytesIO()
    Image.open(digit_files[0]).convert("RGB").save(jpeg, format="JPEG")
    url = f"{server.base}/v1/models/{DIGITS}/predict"
    uploads = {
        "20000x20000 png header": ([("files", ("bomb.png", huge_png_header(20000, 20000), "image/png"))], 413),
        "zero bytes": ([("files", ("empty.png", b"", "image/png"))], 400),
        "text named .png": ([("files", ("notes.png", b"hello, not a picture", "image/png"))], 415),
        "truncated jpeg": ([("files", ("cut.jpg", jpeg.getvalue()[:300], "image/jpeg"))], 400),
        "2,000 parts": ([("files", (f"{i}.png", b"x", "image/png")) for i in range(2000)], 413),
    }
    before = server.rss_mb()
    took = {}
    with httpx.Client(timeout=5) as client:
        for _ in range(3):  # three rounds: memory that grew with each would show
            for what, (files, status) in uploads.items():
                started = time.monotonic()
                r = client.post(url, files=files)
                took[what] = max(took.get(what, 0), time.monotonic() - started)
                assert r.status_code == status, (what, r.text)
                assert_error_body(r, what)
                assert took[what] < 1, (what, took[what])
            # 16 MiB + 1 declared: refused from the header, before a byte of the body is sent
            started = time.monotonic()
            head = (f"POST /v1/models/{DIGITS}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                    f"\r\nContent-Length: {16 * MIB + 1}\r\n\r\n").encode()
            answer, sent = raw_request(int(server.base.rsplit(":", 1)[1]), head, iter([]), limit=0)
            took["over-size, declared"] = max(took.get("over-size, declared", 0), time.monotonic() - started)
            assert answer.startswith(b"HTTP/1.1 413 ") and sent == 0, answer[:200]
            # 64 MiB streamed without a length: counted as it arrives, answered 413 at the limit; we stop
            # sending when the answer comes, long before the 64 MiB went
            started = time.monotonic()
            head = (f"POST /v1/models/{DIGITS}/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                    "\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
            piece = b"10000\r\n" + b"x" * 65536 + b"\r\n"
            answer, sent = raw_request(int(server.base.rsplit(":", 1)[1]), head, iter([piece] * 1024), limit=64 * MIB)
            took["over-size, streamed"] = max(took.get("over-size, streamed", 0), time.monotonic() - started)
            assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
            assert b'"error": "request body is larger than 16,777,216 bytes' in answer, answer[:300]
            assert sent < 32 * MIB, sent  # refused at 16 MiB; the rest is what the socket buffers held
            assert took["over-size, streamed"] < 1, took
    grown = server.rss_mb() - before
    print(f"hostile uploads: slowest {max(took.values()):.3f} s ({max(took, key=took.get)}); RSS {before:.0f} MB, "
          f"grew {grown:.1f} MB")
    assert grown < 50, (before, grown)
    assert httpx.get(f"{server.base}/ready", timeout=5).status_code == 200  # and the server still serves


# ---- load -----------------------------------------------------------------------------------------------

LOAD_REQUESTS, CONCURRENCY, WARM_UP = 10_000, 32, 500


async def post_many(port: int, path: str, bodies: list[bytes], n: int, concurrency: int) -> list[tuple[int, int, bytes]]:
    """n POSTs over `concurrency` keep-alive connections (request i sends bodies[i % len]), raw HTTP/1.1:
    an HTTP library costs more CPU than the server on two cores. (i, status, body) per request."""
    todo = iter(range(n))  # shared: the connections stop when it runs out
    done: list[tuple[int, int, bytes]] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in todo:
            body = bodies[i % len(bodies)]
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1").split("\r\n")
            length = next(int(h.split(":")[1]) for h in head if h.lower().startswith("content-length:"))
            done.append((i, int(head[0].split()[1]), await reader.readexactly(length)))
        writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return done


def test_ten_thousand_requests_at_concurrency_32_all_answered_as_alone(server):
    from sklearn.datasets import load_breast_cancer

    rows = load_breast_cancer().data[:16].tolist()  # 16 different inputs, each asked many times
    bodies = [json.dumps({"inputs": [row]}).encode() for row in rows]
    path, port = f"/v1/models/{TABLE}/predict", int(server.base.rsplit(":", 1)[1])
    solo = [httpx.post(server.base + path, content=b, headers={"content-type": "application/json"}, timeout=10)
            .json()["predictions"] for b in bodies]  # each input alone first: a batch of one
    asyncio.run(post_many(port, path, bodies, WARM_UP, CONCURRENCY))
    warm = server.rss_mb()
    started = time.monotonic()
    done = asyncio.run(post_many(port, path, bodies, LOAD_REQUESTS, CONCURRENCY))
    seconds = time.monotonic() - started
    end = server.rss_mb()
    print(f"load: {len(done)} requests at concurrency {CONCURRENCY} in {seconds:.1f} s "
          f"({len(done) / seconds:.0f}/s); RSS {warm:.0f} -> {end:.0f} MB")
    assert Counter(status for _, status, _ in done) == Counter({200: LOAD_REQUESTS})
    wrong = [(i, body) for i, _, body in done if json.loads(body)["predictions"] != solo[i % len(rows)]]
    assert wrong == [], wrong[:3]
    assert end < warm * 1.05, (warm, end)
    assert "POST /v1/models" not in server.log.read_text()  # no access log unless --access-log
