"""dlkit serve as a service: its answers equal dlkit predict's, its batching, its limits and their
status codes, explanations, metrics, the CLI, and a real uvicorn process started and stopped by PID."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import dlkit
from dlkit.cli import main
from dlkit.data.preprocess import prep_from_dict
from dlkit.predict import Predictor
from dlkit.serve import create_app
from dlkit.serve.batching import Batcher, TorchBackend
from dlkit.serve.inputs import SCRATCH
from dlkit.serve.limits import ClientError

DIGITS, TABLE, TEXT = "digits-cnn", "breast-cancer-lstm", "tiny-text-lstm"


@contextmanager
def ready_client(app, **kwargs) -> Iterator[TestClient]:
    """A started TestClient once /ready answers 200 (models loaded and warmed up)."""
    with TestClient(app, **kwargs) as client:
        deadline = time.monotonic() + 30
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/ready").json()
            time.sleep(0.02)
        yield client


@pytest.fixture(scope="module")
def client(runs):
    with ready_client(create_app(list(runs.values()), backend="torch")) as c:
        yield c


def upload(*paths: Path) -> list:
    return [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


# ---- answers: the same numbers as dlkit predict ------------------------------------------------------

def test_image_predictions_are_dlkit_predicts(client, runs, digit_files):
    predictor = Predictor.from_run(runs[DIGITS])
    for path in digit_files:  # one request per file: the same batch of one as `dlkit predict`, the same numbers
        r = client.post(f"/v1/models/{DIGITS}/predict", files=upload(path))
        assert r.status_code == 200
        (expected,) = predictor.predict([str(path)])
        assert r.json()["predictions"] == [{k: v for k, v in expected.items() if k != "input"}]
        assert r.json()["model"] == DIGITS and r.json()["took_ms"] > 0
    # several files in one request, and base64 in JSON: the same to float rounding (one batch of six)
    many = client.post(f"/v1/models/{DIGITS}/predict", files=upload(*digit_files)).json()["predictions"]
    as_json = client.post(f"/v1/models/{DIGITS}/predict", json={"inputs": [
        base64.b64encode(p.read_bytes()).decode() for p in digit_files]}).json()["predictions"]
    expected = predictor.predict([str(p) for p in digit_files])
    for got, again, want in zip(many, as_json, expected):
        assert got == again and got["label"] == want["label"]
        assert max(abs(got["probabilities"][c] - want["probabilities"][c]) for c in want["probabilities"]) <= 2e-6


def test_table_rows_as_lists_objects_and_csv_are_dlkit_predicts(client, runs, tmp_path):
    predictor = Predictor.from_run(runs[TABLE])
    names = predictor.bundle["preprocessing"]["feature_names"]
    from sklearn.datasets import load_breast_cancer

    rows = load_breast_cancer().data[:3].tolist()
    csv = tmp_path / "rows.csv"
    csv.write_text(",".join(names) + "\n" + "\n".join(",".join(repr(v) for v in row) for row in rows) + "\n")
    expected = [{k: v for k, v in e.items() if k != "input"} for e in predictor.predict([str(csv)])]
    as_lists = client.post(f"/v1/models/{TABLE}/predict", json={"inputs": rows})
    as_objects = client.post(f"/v1/models/{TABLE}/predict", json={"inputs": [dict(zip(names, r)) for r in rows]})
    as_csv = client.post(f"/v1/models/{TABLE}/predict", files=upload(csv))
    assert as_lists.status_code == as_objects.status_code == as_csv.status_code == 200
    assert as_csv.json()["predictions"] == expected  # one CSV, one batch of three, as dlkit predict reads it
    assert as_lists.json()["predictions"] == as_objects.json()["predictions"] == expected


def test_concurrent_table_rows_on_onnx_runtime_are_dlkit_predicts(runs, tmp_path):
    """The ONNX backend's path (quick batches in the event loop, rows normalised and answered once per
    batch): each of 40 concurrent requests answers what `dlkit predict` answers for its row."""
    from concurrent.futures import ThreadPoolExecutor

    from sklearn.datasets import load_breast_cancer

    predictor = Predictor.from_run(runs[TABLE])
    rows = load_breast_cancer().data[:40].tolist()
    expected = [predictor.predict([",".join(repr(v) for v in row)])[0] for row in rows]
    with ready_client(create_app({"t": runs[TABLE]})) as c, ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda row: c.post("/v1/models/t/predict", json={"inputs": [row]}), rows))
        batches = c.get("/metrics").text
    assert [r.status_code for r in got] == [200] * 40
    for r, e in zip(got, expected):
        (g,) = r.json()["predictions"]
        assert g["label"] == e["label"]
        assert max(abs(g["probabilities"][k] - p) for k, p in e["probabilities"].items()) <= 2e-6
    calls = {line.split()[0]: float(line.split()[1]) for line in batches.splitlines() if line.startswith("dlkit_batch")}
    assert calls['dlkit_batch_size_sum{model="t"}'] == 40  # every row reached the model once
    assert 1 <= calls['dlkit_batch_size_count{model="t"}'] <= 40


def test_text_predictions_are_dlkit_predicts(client, runs):
    expected = Predictor.from_run(runs[TEXT]).predict(["a fantastic phone"])[0]
    r = client.post(f"/v1/models/{TEXT}/predict", json={"inputs": ["a fantastic phone"]})
    assert r.json()["predictions"] == [{k: v for k, v in expected.items() if k != "input"}]


def test_models_lists_schema_metrics_and_claim(client, runs):
    r = client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert list(models) == [DIGITS, TABLE, TEXT]
    digits = models[DIGITS]
    assert digits["input"] == {"kind": "image", "channels": 1, "size": [28, 28], "framing": "mnist"}
    assert digits["classes"] == [str(i) for i in range(10)] and digits["task"] == "multiclass"
    assert digits["params"] == 225_034 and digits["ready"] is True
    summary = json.loads((runs[DIGITS] / "summary.json").read_text())
    assert digits["metrics"]["test_accuracy"] == summary["test_accuracy"]
    assert digits["claim"]["source"] == "S0.1" and digits["claim"]["claims"][0]["claimed"] == 0.99
    assert models[TABLE]["input"]["kind"] == "table" and len(models[TABLE]["input"]["features"]) == 30
    assert models[TABLE]["input"]["features"][0] == "mean radius"
    assert models[TEXT]["input"] == {"kind": "text", "max_tokens": 10, "max_chars": 100_000}


def test_health_answers_at_once_and_ready_waits_for_the_models(runs, monkeypatch):
    gate = threading.Event()
    original = Predictor.from_run.__func__

    def slow(cls, path):
        gate.wait(10)
        return original(cls, path)

    monkeypatch.setattr(Predictor, "from_run", classmethod(slow))
    with TestClient(create_app({"d": runs[DIGITS]}, backend="torch")) as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.get("/ready")
        assert r.status_code == 503 and r.json() == {"error": "loading models: d (0 of 1 ready)"}
        assert r.headers["retry-after"] == "1"
        r = c.post("/v1/models/d/predict", json={"inputs": ["x"]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": "model d is still loading; retry when /ready answers 200"}
        gate.set()
        deadline = time.monotonic() + 30
        while (r := c.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.json() == {"status": "ready", "models": ["d"]}


# ---- batching -------------------------------------------------------------------------------------

class Recorder:
    """A backend that records its batch sizes (a linear model: rows independent, as in eval mode)."""

    def __init__(self, delay: float = 0.0):
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(30, 2)
        self.sizes: list[int] = []
        self.delay = delay

    def __call__(self, x):
        self.sizes.append(len(x))
        time.sleep(self.delay)
        with torch.inference_mode():
            return self.layer(x)


def test_concurrent_requests_share_a_batch_and_get_their_own_answers():
    backend = Recorder()
    xs = [torch.randn(n, 30) for n in (1, 3, 2, 1, 4, 1, 2, 2)]
    alone = [backend(x) for x in xs]
    backend.sizes.clear()

    async def go():
        batcher = Batcher("m", backend, max_batch=8, max_wait_ms=50)
        batcher.start()
        out = await asyncio.gather(*(batcher.submit(x) for x in xs))
        await batcher.stop()
        return out

    got = asyncio.run(go())
    # 1+3+2+1 = 7 (the 4 would pass max_batch: it opens the next batch), 4+1+2 = 7, then 2; a request is never split
    assert backend.sizes == [7, 7, 2]
    for g, a in zip(got, alone):
        assert g.shape == a.shape and torch.allclose(g, a, atol=1e-6, rtol=0)


def test_inputs_prepared_in_the_models_thread_share_a_batch_and_a_bad_one_fails_alone():
    backend = Recorder()
    xs = [torch.randn(n, 30) for n in (1, 2, 1, 3)]
    alone = [backend(x) for x in xs]
    backend.sizes.clear()
    threads: set[str] = set()

    def make(x, extra):
        def prepared():
            threads.add(threading.current_thread().name)
            if x is None:
                raise ClientError(400, "inputs[0]: not a row")
            return x, extra
        return prepared

    async def go():
        batcher = Batcher("m", backend, max_batch=8, max_wait_ms=50)
        batcher.start()
        jobs = [batcher.submit_later(make(x, f"note {i}"), len(x)) for i, x in enumerate(xs[:2])]
        jobs.append(batcher.submit_later(make(None, None), 1))
        jobs += [batcher.submit_later(make(x, f"note {i}"), len(x)) for i, x in enumerate(xs[2:], 2)]
        out = await asyncio.gather(*jobs, return_exceptions=True)
        # a request that turns out larger than expected (a CSV of 12 rows) runs in chunks of max_batch
        big = torch.randn(12, 30)
        logits, _ = await batcher.submit_later(make(big, None), 1)
        await batcher.stop()
        return out, big, logits

    (a, b, bad, c, d), big, logits = asyncio.run(go())
    assert isinstance(bad, ClientError) and bad.status == 400  # its own answer; the others are answered
    for (got, note), i in zip((a, b, c, d), range(4)):
        assert note == f"note {i}" and torch.allclose(got, alone[i], atol=1e-6, rtol=0)
    assert backend.sizes == [7, 8, 4]  # one model call for the four good requests; 12 rows as 8 + 4
    assert torch.allclose(logits, backend.layer(big).detach(), atol=1e-6, rtol=0)
    assert threads == {"dlkit-m_0"}  # prepared in the model's own thread


def test_the_digit_cnns_answers_do_not_depend_on_their_batch(runs, digit_files):
    predictor = Predictor.from_run(runs[DIGITS])
    spec = prep_from_dict(predictor.bundle["preprocessing"])
    xs = [spec.read(str(p))[0] for p in digit_files]
    backend = TorchBackend(predictor.model)
    alone = [backend(x) for x in xs]

    async def go():
        batcher = Batcher("d", backend, max_batch=32, max_wait_ms=50, observe=sizes.append)
        batcher.start()
        out = await asyncio.gather(*(batcher.submit(x) for x in xs))
        await batcher.stop()
        return out

    sizes: list[int] = []
    got = asyncio.run(go())
    assert sizes == [6]
    for g, a in zip(got, alone):
        assert (g.softmax(1) - a.softmax(1)).abs().max() <= 1e-6


def test_a_batch_is_prepared_and_finished_once_and_each_request_gets_its_rows():
    backend = Recorder()
    prepared: list[int] = []

    def prepare(x):  # a table's normalisation: row by row, once over the whole batch
        prepared.append(len(x))
        return x * 2

    def finish(logits):  # logits to one answer per row, once per batch
        return [f"row {i}: {v:.6f}" for i, v in enumerate(logits[:, 0].tolist())]

    xs = [torch.randn(n, 30) for n in (1, 3, 2)]
    expected = [backend(2 * torch.cat(xs))[:, 0].tolist()]
    backend.sizes.clear()

    async def go():
        batcher = Batcher("m", backend, max_batch=8, max_wait_ms=50, prepare=prepare, finish=finish)
        batcher.start()
        out = await asyncio.gather(*(batcher.submit(x) for x in xs))
        await batcher.stop()
        return out

    got = asyncio.run(go())
    assert backend.sizes == [6] and prepared == [6]
    rows = [f"row {i}: {v:.6f}" for i, v in enumerate(expected[0])]
    assert got == [rows[:1], rows[1:4], rows[4:]]


def test_a_quick_batch_runs_in_the_event_loop_and_a_slow_one_in_the_models_thread():
    class Timed(Recorder):
        def __call__(self, x):
            threads.append(threading.current_thread().name)
            return super().__call__(x)

    threads: list[str] = []
    backend = Timed()

    async def go(inline: bool) -> list[str]:
        threads.clear()
        backend.delay = 0.0
        batcher = Batcher("m", backend, max_batch=8, inline=inline)
        batcher.start()
        loop_thread = threading.current_thread().name
        for delay in (0.0, 0.0, 0.05, 0.05, 0.0):
            backend.delay = delay  # a batch expected quick runs inline even when it turns out slow
            await batcher.submit(torch.zeros(1, 30))
        await batcher.stop()
        return ["loop" if t == loop_thread else t for t in threads]

    # unknown at first (the thread); quick (the loop); 50 ms per row: expected quick, so inline, then the
    # thread until recent batches are quick again (0.75 of 50 ms is still over the 5 ms switch interval)
    assert asyncio.run(go(True)) == ["dlkit-m_0", "loop", "loop", "dlkit-m_0", "dlkit-m_0"]
    assert asyncio.run(go(False)) == ["dlkit-m_0"] * 5  # a backend that others call from the model's thread


def test_a_full_queue_answers_503_and_a_late_request_504_and_is_dropped():
    backend = Recorder(delay=0.3)

    async def go():
        batcher = Batcher("m", backend, max_batch=1, max_wait_ms=0, queue_limit=2, timeout_s=0.2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(torch.zeros(1, 30)))  # runs, 0.3 s
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.submit(torch.zeros(1, 30))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ClientError) as full:
            await batcher.submit(torch.zeros(1, 30))
        results = await asyncio.gather(first, *waiting, return_exceptions=True)
        await asyncio.sleep(0.4)
        await batcher.stop()
        return full.value, results

    full, results = asyncio.run(go())
    assert full.status == 503 and full.headers == {"Retry-After": "1"}
    assert str(full) == "model m has 2 requests waiting; retry shortly"
    assert all(isinstance(r, ClientError) and r.status == 504 for r in results)
    assert str(results[1]) == "model m did not answer within 0.2 s; the server is overloaded, retry later"
    assert backend.sizes == [1]  # the two late requests never reached the model


def test_batched_answers_over_http_equal_solo_ones(runs, digit_files):
    app = create_app({"d": runs[DIGITS]}, backend="torch", max_batch=8, max_wait_ms=100)
    with ready_client(app) as c:
        solo = [c.post("/v1/models/d/predict", files=upload(p)).json()["predictions"][0] for p in digit_files]
        together: list = [None] * len(digit_files)

        def ask(i):
            together[i] = c.post("/v1/models/d/predict", files=upload(digit_files[i])).json()["predictions"][0]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(digit_files))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sizes = c.get("/metrics").text
    assert 'dlkit_batch_size_bucket{model="d",le="1"}' in sizes
    calls = [line for line in sizes.splitlines() if line.startswith('dlkit_batch_size_count{model="d"}')]
    assert int(calls[0].split()[-1]) < 12  # six solo calls, then the six concurrent requests in fewer than six
    for a, b in zip(solo, together):  # within 1e-6 before rounding to 6 decimals: at most one step of it after
        assert a["label"] == b["label"]
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) <= 1e-6 + 1e-12


# ---- limits, auth and hostile inputs ----------------------------------------------------------------

def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (and no pixel data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_hostile_uploads_are_4xx_with_one_message(client, digit_files):
    jpeg = io.BytesIO()
    Image.open(digit_files[0]).convert("RGB").save(jpeg, format="JPEG")
    url = f"/v1/models/{DIGITS}/predict"
    cases = {
        "zero bytes": (("empty.png", b""), 400, "empty.png: empty file; expected an image "
                                                "(PNG, JPEG, GIF, BMP, TIFF, WebP or a .npy array)"),
        "text named .png": (("notes.png", b"hello, not a picture"), 415,
                            "notes.png: not an image format dlkit reads; expected PNG, JPEG, GIF, BMP, TIFF, WebP "
                            "or a .npy array"),
        "truncated jpeg": (("cut.jpg", jpeg.getvalue()[:300]), 400,
                           "cut.jpg: not a readable image (Truncated File Read); "
                           "expected an image file (PNG, JPEG, BMP, GIF, TIFF, WebP) or a .npy array in [0, 1]"),
        "20000x20000 header": (("bomb.png", huge_png_header(20000, 20000)), 413,
                               "bomb.png: 400,000,000 pixels is more than the 40 megapixels dlkit decodes; shrink the "
                               "picture first (e.g. to 4000 pixels on its longer side, or save it as JPEG, which is "
                               "reduced as it is read)"),
    }
    for what, ((name, data), status, message) in cases.items():
        started = time.perf_counter()
        r = client.post(url, files=[("files", (name, data, "image/png"))])
        assert (r.status_code, r.json()) == (status, {"error": message}), what
        assert time.perf_counter() - started < 1, what


def test_thousands_of_parts_and_oversized_bodies_are_413(client):
    url = f"/v1/models/{DIGITS}/predict"
    parts = [("files", (f"{i}.png", b"x", "image/png")) for i in range(5000)]
    started = time.perf_counter()
    r = client.post(url, files=parts)
    assert r.status_code == 413
    assert r.json() == {"error": "Too many files. Maximum number of files is 64. Send at most 64 files per request"}
    assert time.perf_counter() - started < 1
    big = b"x" * (16 * 1024 * 1024 + 1)
    r = client.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert r.json() == {"error": "request body is larger than 16,777,216 bytes; send less at once"}

    def chunks():  # no Content-Length: counted as it streams, refused before the end
        for _ in range(20):
            yield b"x" * (1024 * 1024)
    r = client.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_client_mistakes_map_to_their_status(client):
    post = client.post
    checks = [
        (post("/v1/models/digit-cnn/predict", json={"inputs": []}), 404,
         "no model named 'digit-cnn' (did you mean 'digits-cnn'?); this server has digits-cnn, breast-cancer-lstm, "
         "tiny-text-lstm"),
        (client.get(f"/v1/models/{DIGITS}/predict"), 405, f"GET is not allowed on /v1/models/{DIGITS}/predict"),
        (client.get("/v2"), 404, "no route /v2; see /docs"),
        (post(f"/v1/models/{DIGITS}/predict", content=b"{oops", headers={"content-type": "application/json"}), 422,
         "body is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        (post(f"/v1/models/{DIGITS}/predict", json=[1]), 422, 'expected a JSON object {"inputs": [...]}'),
        (post(f"/v1/models/{DIGITS}/predict", content=b"hi", headers={"content-type": "text/plain"}), 415,
         "content type 'text/plain': send multipart/form-data with files in the field 'files', or application/json "
         '{"inputs": [...]}'),
        (post(f"/v1/models/{DIGITS}/predict", json={"inputs": []}), 400, 'no inputs: send one or more in {"inputs": [...]}'),
        (post(f"/v1/models/{DIGITS}/predict", json={"inputs": ["%%%"]}), 400,
         "inputs[0]: not valid base64; send the image file's bytes base64-encoded"),
        (post(f"/v1/models/{DIGITS}/predict", json={"inputs": [3]}), 400,
         "inputs[0]: an image model takes images as base64 strings, got 3"),
        (post(f"/v1/models/{DIGITS}/predict", json={"inputs": ["aGk="] * 65}), 413,
         "65 inputs in one request; send at most 64 per request"),
        (post(f"/v1/models/{TABLE}/predict", json={"inputs": [[1, 2]]}), 400,
         "inputs[0]: expected 30 values per row (mean radius, ..., worst fractal dimension), got 2"),
        (post(f"/v1/models/{TABLE}/predict", json={"inputs": [{"mean radius": 1}]}), 400,
         "inputs[0]: the row lacks 'mean texture'; expected the 30 features mean radius, ..., worst fractal dimension"),
        (post(f"/v1/models/{TABLE}/predict", json={"inputs": [[1] * 29 + [True]]}), 400,
         "inputs[0]: True is not a finite number; expected 30 numbers"),
        (post(f"/v1/models/{TABLE}/predict", json={"inputs": [[0.0] * 30] * 1025}), 413,
         "1,025 table rows in one request; send at most 1,024 per request"),
        (post(f"/v1/models/{TABLE}/predict", files=[("files", ("r.csv", b"1,2,3\n", "text/csv"))]), 400,
         "r.csv: expected 30 values per row (mean radius, ...), got 3 on line 1"),
        (post(f"/v1/models/{TEXT}/predict", json={"inputs": ["x" * 100_001]}), 413,
         "inputs[0]: 100,001 characters is more than the 100,000 a text may hold; send a shorter text"),
        (post(f"/v1/models/{TEXT}/predict", json={"inputs": ["   "]}), 400,
         'empty text: give the text to classify, e.g. dlkit predict RUN "a fine film"'),
        (post(f"/v1/models/{TEXT}/predict", files=[("files", ("t.txt", b"\xff\xfe\xfa", "text/plain"))]), 400,
         "t.txt: not UTF-8 text; a text model reads UTF-8 text files"),
        (post(f"/v1/models/{TABLE}/explain", json={"inputs": [[0] * 30]}), 400,
         f"model {TABLE} reads table rows; explain draws Grad-CAM for image models and token importance for text models"),
    ]
    for r, status, message in checks:
        assert (r.status_code, r.json()) == (status, {"error": message})


def test_text_paths_are_never_read_as_files(client, runs, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("Terrible customer service, never again")
    predictor = Predictor.from_run(runs[TEXT])
    as_words = predictor.predict_tensor(prep_from_dict(predictor.bundle["preprocessing"]).apply([str(secret)]))
    r = client.post(f"/v1/models/{TEXT}/predict", json={"inputs": [str(secret)]})
    assert r.json()["predictions"] == as_words  # the path's words were classified; the file was never opened


def test_api_key_guards_v1_only(runs, tmp_path):
    key = "k" * 32
    app = create_app({"t": runs[TABLE]}, backend="torch", api_key=key)
    with ready_client(app) as c:
        row = {"inputs": [[0.0] * 30]}
        r = c.post("/v1/models/t/predict", json=row)
        assert (r.status_code, r.json()) == (401, {"error": "this server needs an API key: send 'Authorization: "
                                                            "Bearer KEY' or 'X-API-Key: KEY'"})
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert (r.status_code, r.json()) == (401, {"error": "wrong API key"})
        assert c.post("/v1/models/t/predict", json=row, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert "access-control-allow-origin" not in c.get("/health", headers={"Origin": "http://x.test"}).headers


def test_cors_only_when_asked(runs):
    with TestClient(create_app({"t": runs[TABLE]}, backend="torch", cors="http://page.test")) as c:
        r = c.get("/health", headers={"Origin": "http://page.test"})
        assert r.headers["access-control-allow-origin"] == "http://page.test"


def test_a_bug_is_a_logged_500_with_one_message(runs, caplog):
    app = create_app({"t": runs[TABLE]}, backend="torch")
    with ready_client(app, raise_server_exceptions=False) as c:
        def broken(x):
            raise RuntimeError("boom")
        app.state.models["t"].batcher.backend = broken
        r = c.post("/v1/models/t/predict", json={"inputs": [[0.0] * 30]})
    assert (r.status_code, r.json()) == (500, {"error": "internal error (a bug in dlkit serve, logged by the server); "
                                                        "please report it"})
    assert "RuntimeError: boom" in caplog.text


# ---- explanations, metrics, page ----------------------------------------------------------------------

def test_explain_draws_the_gradcam_png_and_leaves_no_files(client, digit_files):
    scratch = Path(SCRATCH or tempfile.gettempdir())  # where serve makes its private folders
    before = {p.name for p in scratch.glob("dlkit-serve-*")}
    r = client.post(f"/v1/models/{DIGITS}/explain", files=upload(digit_files[0]))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(r.content))
    assert picture.format == "PNG" and picture.width > 224  # the 56x56 page enlarged to 224, a scale beside it
    assert r.headers["x-label"] in [str(i) for i in range(10)] and 0 < float(r.headers["x-confidence"]) <= 1
    assert client.post(f"/v1/models/{DIGITS}/predict", files=upload(digit_files[0])).status_code == 200
    assert {p.name for p in scratch.glob("dlkit-serve-*")} == before  # nor does predict
    r = client.post(f"/v1/models/{DIGITS}/explain", files=upload(*digit_files[:2]))
    assert (r.status_code, r.json()) == (400, {"error": "explain takes one input, got 2"})


def test_explain_scores_each_token_of_a_text(client):
    r = client.post(f"/v1/models/{TEXT}/explain", json={"inputs": ["Great value, a fantastic phone"]})
    assert r.status_code == 200
    body = r.json()
    assert [t["token"] for t in body["tokens"]] == ["great", "value", "a", "fantastic", "phone"]
    assert body["label"] in ("negative", "positive") and all(isinstance(t["importance"], float) for t in body["tokens"])


def test_metrics_count_requests_latency_batches_and_queue(client):
    client.post(f"/v1/models/{TABLE}/predict", json={"inputs": [[0.0] * 30]})
    client.post("/v1/models/nothing-here/predict", json={"inputs": []})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert f'dlkit_requests_total{{model="{TABLE}",endpoint="predict",status="200"}}' in text
    assert 'dlkit_requests_total{model="-",endpoint="predict",status="404"}' in text  # unknown names not labels
    assert f'dlkit_request_seconds_bucket{{model="{TABLE}",endpoint="predict",le="+Inf"}}' in text
    assert f'dlkit_batch_size_count{{model="{TABLE}"}}' in text
    assert f'dlkit_queue_depth{{model="{TABLE}"}} 0' in text


def test_the_page_says_it_comes_later_until_it_exists(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    if not (Path(dlkit.__file__).parent / "serve" / "page.html").is_file():
        assert "the web page comes later" in r.text
    assert client.get("/docs").status_code == 200
    assert "/v1/models/{name}/predict" in client.get("/openapi.json").json()["paths"]


def test_the_onnx_backend_exports_on_first_serve_and_answers_as_torch_does(runs, digit_files, tmp_path):
    import shutil

    run = Path(shutil.copytree(runs[DIGITS], tmp_path / "digits"))
    assert not (run / "model.onnx").exists()
    with ready_client(create_app({"d": run})) as onnx, ready_client(create_app({"d": run}, backend="torch")) as eager:
        for path in digit_files:
            a = onnx.post("/v1/models/d/predict", files=upload(path)).json()["predictions"][0]
            b = eager.post("/v1/models/d/predict", files=upload(path)).json()["predictions"][0]
            assert a["label"] == b["label"]
            assert max(abs(a["probabilities"][c] - b["probabilities"][c]) for c in a["probabilities"]) <= 2e-6
    bundle = json.loads((run / "bundle.json").read_text())
    assert set(bundle["files"]) == {"model.safetensors", "model.onnx"}  # exported once, verified before use
    assert bundle["exports"]["onnx"]["max_abs_diff"] < 1e-4


# ---- the command line and a real server -----------------------------------------------------------------

def established_by_process(port: int, pids: list[int]) -> dict[int, int]:
    """How many established TCP connections on local `port` each process holds (from /proc: Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                inodes.add(fields[9])
    held = {}
    for pid in pids:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        held[pid] = sum(link.startswith("socket:[") and link[8:-1] in inodes for link in links)
    return held


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-worker sockets (SO_REUSEPORT) are Linux's")
def test_metrics_add_up_other_workers_and_drop_a_dead_ones_queue(tmp_path):
    from dlkit.serve.metrics import Metrics, Shared

    mine = Metrics(lambda: {"t": 2})
    mine.request("t", "predict", 200, 0.003)
    mine.batch("t", 4)
    other = Metrics(lambda: {"t": 5})
    for _ in range(3):
        other.request("t", "predict", 200, 0.02)
    other.request("t", "predict", 400, 0.001)
    shared = Shared(tmp_path, workers=3)
    shared.publish(mine.state(), ready=True)  # this process's own file: read live, not from the folder
    (tmp_path / "worker-1-0.json").write_text(json.dumps({**other.state(), "ready": True, "time": time.time()}))
    (tmp_path / "worker-2-0.json").write_text(json.dumps({**other.state(), "ready": True, "time": time.time() - 60}))
    text = mine.render(shared.others())
    assert 'dlkit_requests_total{model="t",endpoint="predict",status="200"} 7' in text  # 1 + 3 + 3 (dead: kept)
    assert 'dlkit_requests_total{model="t",endpoint="predict",status="400"} 2' in text
    assert 'dlkit_request_seconds_bucket{model="t",endpoint="predict",le="0.005"} 3' in text  # 0.003 and two 0.001
    assert 'dlkit_request_seconds_count{model="t",endpoint="predict"} 9' in text
    assert 'dlkit_batch_size_sum{model="t"} 4.000000' in text
    assert 'dlkit_queue_depth{model="t"} 7' in text  # 2 + 5; the dead worker's queue is gone
    assert shared.ready_workers() == 2  # this one and worker 1; worker 2 stopped publishing


def predictions_total(base: str) -> float:
    """dlkit_requests_total of model t's answered predictions, as /metrics says on a new connection."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    line = 'dlkit_requests_total{model="t",endpoint="predict",status="200"} '
    return next((float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)), 0.0)


def test_workers_share_connections_and_add_up_their_metrics(runs, serving, tmp_path):
    log = tmp_path / "server.log"
    with serving([f"t={runs[TABLE]}", "--backend", "torch", "--workers", "2"], log) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while log.read_text().count("Application startup complete.") < 2:  # both listening, not one of them
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        workers = [int(pid) for pid in re.findall(r"Started server process \[(\d+)\]", log.read_text())]
        shares = []
        for _ in range(3):  # 32 keep-alive connections opened at once, as a load generator or a proxy opens them
            clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
            for c in clients:
                c.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert all(c.recv(4096).startswith(b"HTTP/1.1 200") for c in clients)
            held = established_by_process(port, workers)
            shares.append(sorted(held.values()))
            for c in clients:
                c.close()
        body = json.dumps({"inputs": [[0.0] * 30]}).encode()
        request = (b"POST /v1/models/t/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        for _ in range(40):  # each on a new connection: both workers answer some
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(request)
                assert c.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)  # each worker publishes its numbers every second
        scraped = [predictions_total(base) for _ in range(8)]  # 8 new connections: both workers answer /metrics
        os.kill(workers[0], signal.SIGKILL)  # a worker dies: its replacement takes over its socket
        while log.read_text().count("Application startup complete.") < 3:
            assert time.monotonic() < deadline + 60, log.read_text()
            time.sleep(0.1)
        replacement = int(re.findall(r"Started server process \[(\d+)\]", log.read_text())[-1])
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        for c in clients:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert all(c.recv(4096).startswith(b"HTTP/1.1 200") for c in clients)
        after = established_by_process(port, [replacement, workers[1]])
        for c in clients:
            c.close()
        while httpx.get(f"{base}/ready", timeout=10).status_code != 200:  # both workers' models again
            assert time.monotonic() < deadline + 90, log.read_text()
            time.sleep(0.2)
        kept = predictions_total(base)
        assert proc.returncode is None
    # one shared socket gave one worker 24, 25 and 29 of 32 in three such bursts; a socket each spreads them
    # by hash: over 96 connections each worker holds 28-68 (4 standard deviations of a fair split)
    assert all(sum(share) == 32 and len(share) == 2 for share in shares), shares
    assert all(28 <= sum(share[i] for share in shares) <= 68 for i in range(2)), shares
    assert "a socket each" in log.read_text()
    assert f"Child process [{workers[0]}] died" in log.read_text()
    assert sum(after.values()) == 32 and min(after.values()) >= 4, after  # P(< 4 of 32) is 1.3e-6 a side
    assert scraped == [40] * 8  # whichever worker answers adds up both (alone each had about 20)
    assert kept == 40  # the dead worker's counts stay in the sum: a counter never goes down


def test_freeze_gc_hands_what_is_alive_once_loaded_to_gc_freeze(runs):
    import gc

    assert gc.get_freeze_count() == 0
    with ready_client(create_app({"t": runs[TABLE]}, backend="torch")):
        assert gc.get_freeze_count() == 0  # only when asked: a process that only serves (dlkit serve)
    try:
        with ready_client(create_app({"t": runs[TABLE]}, backend="torch", freeze_gc=True)) as c:
            frozen = gc.get_freeze_count()
            assert c.post("/v1/models/t/predict", json={"inputs": [[0.0] * 30]}).status_code == 200
    finally:
        gc.unfreeze()
    assert frozen > 10_000  # torch, the libraries and the model: out of every full collection's walk


def test_serve_mistakes_are_one_error_line(runs, tmp_path, capsys):
    short = tmp_path / "key"
    short.write_text("abc\n")
    cases = [
        (["serve", str(tmp_path / "nope"), "--backend", "torch"],
         f"error: run directory {tmp_path / 'nope'} not found; pass the folder `dlkit run` printed"),
        (["serve", str(runs[TABLE]), "--backend", "tf"], "error: backend must be 'onnx' or 'torch', got 'tf'"),
        (["serve", str(runs[TABLE]), f"x={runs[TABLE]}", "--backend", "torch", "--api-key-file", str(short)],
         f"error: --api-key-file {short}: the key on its first line must be at least 16 characters"),
        (["serve", f"a={runs[TABLE]}", f"a={runs[TEXT]}", "--backend", "torch"],
         f"error: two runs are both named 'a' ({runs[TABLE]} and {runs[TEXT]}); name them with NAME=RUN"),
    ]
    taken = socket.create_server(("127.0.0.1", 0))  # a port something else listens on
    port = taken.getsockname()[1]
    for workers in ("1", "2"):
        cases.append((["serve", str(runs[TABLE]), "--backend", "torch", "--port", str(port), "--workers", workers],
                      f"error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port"))
    with taken:
        for argv, line in cases:
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            assert exit_.value.code == 2
            assert capsys.readouterr().err.strip().splitlines() == [line]


def test_a_real_server_starts_answers_and_stops_on_sigterm(runs, serving, tmp_path):
    log = tmp_path / "server.log"
    with serving([f"t={runs[TABLE]}", "--backend", "torch", "--access-log"], log) as (base, proc):
        r = httpx.post(f"{base}/v1/models/t/predict", json={"inputs": [[0.0] * 30]}, timeout=5)
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("malignant", "benign")
    text = log.read_text()
    assert proc.returncode == 0, text  # uvicorn takes SIGTERM as the order to stop: a graceful shutdown, exit 0
    assert "Traceback" not in text and "Application shutdown complete" in text, text
    assert '"POST /v1/models/t/predict HTTP/1.1" 200' in text  # --access-log: a line per request
