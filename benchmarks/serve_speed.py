"""`dlkit serve` (ONNX Runtime, batching) against a naive FastAPI server (the same model in torch eager,
one request at a time), one load generator, one run.

Models: the seed MNIST CNN (digits-cnn, one epoch) asked with a 56x56 PNG digit as base64 JSON, and
the S0.2-style breast-cancer LSTM (breast-cancer-lstm, one epoch) asked with one table row. The
servers are uvicorn processes on loopback ports with uvicorn's defaults (so httptools and uvloop,
dlkit's dependencies, serve them all) and OMP_WAIT_POLICY=PASSIVE unless set (see `start`): dlkit serve
as it starts by default, the same with a 5 ms batching window, the same with one process per core
(`--workers`, measured at concurrency 32), and the naive one (this file, `--naive`), which also has
`POST /floor`: it reads the body and answers a constant, the HTTP floor under them all.
The load generator is raw HTTP/1.1 over keep-alive connections, on uvloop where installed (cheaper
than an HTTP library: on two cores the client shares the CPU with the servers). For each concurrency
(1, 8, 32), closed loop: every connection sends its next request when the last one is answered.
Prints one JSON line per (target, model, concurrency): requests/s and p50/p95/p99 ms, plus the
machine (cores, CPU, torch and ONNX Runtime threads) and ONNX Runtime's own time for one row; dlkit's
lines also give their throughput and p99 as a ratio of the naive server's in the same run.
Goal (issue 15): at concurrency 32, >= 3x the naive server's throughput with a p99 no worse; at
concurrency 1, p50 within 1 ms of the floor plus ONNX Runtime's own time (and, beside it, that limit
counting the input's preparation too). One `"target": "goal"` line per model and concurrency 1 and 32
says whether it is met, and at 32 what this machine allows, as multiples of the naive server's
throughput: `floor_rps_vs_naive`, the HTTP floor's (it does no work at all, and the load generator
shares the same cores), and `prep_bound_rps_vs_naive`, 1000 / (`prep_ms_one_input` + ONNX Runtime's
time): preparing an input is Python under one GIL, so one server process answers no faster even with
HTTP free. Below 3, the 3x goal cannot be met by one process whatever the batching.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request  # at module level: FastAPI reads the handlers' annotations

HOST = "127.0.0.1"
CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 400, 8: 1200, 32: 2400}  # per measurement, after 100 warm-up requests


# ---- the naive server -------------------------------------------------------------------------------

def naive_app(runs: dict[str, str]):
    """FastAPI over the runs' torch models, eager, one request at a time (an asyncio.Lock)."""
    import torch

    from dlkit.data.preprocess import prep_from_dict
    from dlkit.predict import Predictor
    from dlkit.serve.inputs import answers, prepare

    app = FastAPI()
    predictors = {name: Predictor.from_run(run) for name, run in runs.items()}
    specs = {name: prep_from_dict(p.bundle["preprocessing"]) for name, p in predictors.items()}
    lock = asyncio.Lock()

    @app.post("/floor")
    async def floor(request: Request) -> dict:
        await request.body()
        return {"ok": True}

    @app.get("/threads")
    async def threads() -> dict:
        return {"torch_threads": torch.get_num_threads()}

    @app.post("/v1/models/{name}/predict")
    async def predict(name: str, request: Request) -> dict:
        p = predictors[name]
        body = json.loads(await request.body())
        async with lock:  # one request at a time, in the event loop: the notebook way to serve
            x = torch.cat([rows for rows, _ in prepare(specs[name], [("x", v) for v in body["inputs"]], False)])
            with torch.inference_mode():
                logits = p.model.eval()(x)
        return {"model": name, "predictions": answers(p.bundle, logits, [None] * len(x))}

    return app


# ---- the load generator -----------------------------------------------------------------------------

def http_post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(h.split(":", 1)[1]) for h in lines if h.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def load(port: int, request: bytes, n: int, concurrency: int) -> tuple[float, list[float], int]:
    """n requests over `concurrency` keep-alive connections: seconds, latencies (ms), non-200 count."""
    todo = iter(range(n))
    latencies: list[float] = []
    errors = 0

    async def connection() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(HOST, port)
        for _ in todo:
            started = time.perf_counter()
            writer.write(request)
            status, _ = await answer(reader)
            latencies.append((time.perf_counter() - started) * 1000)
            errors += status != 200
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, errors


def run_loop(coro):
    """The load generator's event loop: uvloop where installed (it leaves more of the shared cores to the
    servers, to both alike)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def http_stack() -> str:
    """What uvicorn (loop="auto", http="auto": both servers) runs on: httptools and uvloop when installed."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http} + {loop}"


def measure(port: int, path: str, body: bytes, concurrency: int) -> dict:
    request = http_post(path, body)
    run_loop(load(port, request, 100, concurrency))
    seconds, ms, errors = run_loop(load(port, request, REQUESTS[concurrency], concurrency))
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"requests": len(ms), "errors": errors, "rps": round(len(ms) / seconds, 1),
            "p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2)}


# ---- the run ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    """A server process on a free port, once it answers 200 at /ready (dlkit) or /threads (naive)."""
    import httpx

    port = free_port()
    # OpenMP threads that sleep when idle (libgomp spins by default): spinning, the naive server's two torch
    # threads fight the load generator for the two cores, and it answered 15-80 requests/s instead of
    # 150-1,000 here. Every server gets the same setting, so the comparison is of serving, not of that.
    env = {**os.environ, "DLKIT_REPORT": "0", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server {args} did not start:\n{log.read_text()}")
        try:
            if httpx.get(f"http://{HOST}:{port}/ready", timeout=1).status_code == 200 or \
                    httpx.get(f"http://{HOST}:{port}/threads", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def inputs(runs: dict[str, Path]) -> dict[str, bytes]:
    """Each model's request body: a real digit (sklearn's scan, 56x56 PNG, base64) and a table row."""
    from PIL import Image
    from sklearn.datasets import load_breast_cancer, load_digits

    page = 255 - np.kron(load_digits().images[0] / 16 * 255, np.ones((7, 7))).astype(np.uint8)
    png = io.BytesIO()
    Image.fromarray(page).save(png, format="PNG")
    return {"digits-cnn": json.dumps({"inputs": [base64.b64encode(png.getvalue()).decode()]}).encode(),
            "breast-cancer-lstm": json.dumps({"inputs": [load_breast_cancer().data[0].tolist()]}).encode()}


def own_time(run: Path, body: bytes) -> dict:
    """In this process, for the request's one input: ONNX Runtime's own time (`ort_ms`) and the time
    dlkit takes to prepare it from the request's JSON value (`prep_ms`), medians of 200 calls; ONNX
    Runtime's intra-op threads (0: its default) and whether they spin between runs."""
    import torch

    from dlkit.data.preprocess import prep_from_dict
    from dlkit.rundir import RunDir
    from dlkit.serve.inputs import prepare
    from dlkit.serve.onnx_backend import OnnxBackend

    backend = OnnxBackend.from_run(RunDir.open(run))
    spec = prep_from_dict(RunDir.open(run).bundle()["preprocessing"])
    items = [("x", v) for v in json.loads(body)["inputs"]]
    x = torch.cat([r for r, _ in prepare(spec, items, False)])

    def median_ms(fn) -> float:
        times = []
        for _ in range(220):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
        return float(np.median(times[20:]))

    options = backend.sess.get_session_options()
    try:
        spin = options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except Exception:  # not set: ONNX Runtime's default, which spins
        spin = True
    return {"ort_ms": median_ms(lambda: backend(x)), "prep_ms": median_ms(lambda: prepare(spec, items, False)),
            "threads": options.intra_op_num_threads, "spin": spin}


def goal(model: str, concurrency: int, dlkit: dict, naive: dict, floor: dict, own: dict) -> dict:
    """Issue 15's goal for one model at concurrency 32 (3x the naive throughput, p99 no worse) or 1 (p50
    within 1 ms of the floor plus ONNX Runtime's own time), and at 32 the most this machine allows: the
    floor's throughput (an endpoint doing nothing), and for a model whose input takes long to prepare,
    1000 / (prep_ms + ort_ms) requests/s (preparing is Python, under one GIL in one server process,
    even with HTTP free), each as a multiple of the naive server's throughput."""
    line = {"benchmark": "serve_speed", "target": "goal", "model": model, "concurrency": concurrency}
    if concurrency == 1:
        limit = floor["p50_ms"] + own["ort_ms"] + 1.0
        return line | {"goal": "p50 <= floor p50 + ONNX Runtime's time + 1 ms", "p50_ms": dlkit["p50_ms"],
                       "limit_ms": round(limit, 2), "prep_ms_one_input": round(own["prep_ms"], 3),
                       "met": dlkit["p50_ms"] <= limit,
                       # the same limit counting the input's preparation, which the goal leaves out
                       "limit_with_prep_ms": round(limit + own["prep_ms"], 2),
                       "met_with_prep": dlkit["p50_ms"] <= limit + own["prep_ms"]}
    ratio = dlkit["rps"] / naive["rps"]
    ceiling = floor["rps"] / naive["rps"]
    work_ceiling = 1000 / (own["prep_ms"] + own["ort_ms"]) / naive["rps"]
    return line | {"goal": ">= 3x the naive server's requests/s, p99 no worse", "rps_vs_naive": round(ratio, 2),
                   "p99_ms": dlkit["p99_ms"], "naive_p99_ms": naive["p99_ms"],
                   "floor_rps_vs_naive": round(ceiling, 2), "prep_ms_one_input": round(own["prep_ms"], 3),
                   "prep_bound_rps_vs_naive": round(work_ceiling, 2),
                   "reachable_here": min(ceiling, work_ceiling) >= 3,
                   "met": ratio >= 3 and dlkit["p99_ms"] <= naive["p99_ms"]}


def cpu() -> str:
    """The CPU's model name and its widest vector instructions (from /proc/cpuinfo; Linux only)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    vector = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{name}, {vector}"


def main() -> None:
    import torch

    import dlkit

    load = round(os.getloadavg()[0], 2)  # before this benchmark's own work: others' work on the same cores
    root = Path(tempfile.mkdtemp(prefix="serve-speed-"))
    runs = {name: dlkit.run(name, epochs=1, out=root / name, quiet=True, report=False).run_dir
            for name in ("digits-cnn", "breast-cancer-lstm")}
    bodies = inputs(runs)
    own = {name: own_time(run, bodies[name]) for name, run in runs.items()}
    this = str(Path(__file__).resolve())
    served = [f"{n}={r}" for n, r in runs.items()]
    dlkit_proc, dlkit_port = start(["-m", "dlkit", "serve", *served], root / "dlkit.log")
    naive_proc, naive_port = start([this, "--naive", *served], root / "naive.log")
    # the same server waiting up to 5 ms for batch-mates: what a batching window costs a lone client
    wait_proc, wait_port = start(["-m", "dlkit", "serve", *served, "--max-wait-ms", "5"], root / "wait.log")
    # one server process per core (--workers): preparing inputs is Python, one GIL per process
    workers = os.cpu_count() or 1
    many_proc, many_port = start(["-m", "dlkit", "serve", *served, "--workers", str(workers)], root / "many.log")
    import httpx

    machine = {"cores": os.cpu_count(), "cpu": cpu(), "torch": torch.__version__,
               "naive_torch_threads": httpx.get(f"http://{HOST}:{naive_port}/threads").json()["torch_threads"],
               "ort_intra_op_threads": own["digits-cnn"]["threads"] or "default (one per core)",
               "ort_inter_op_threads": 1, "ort_threads_spin": own["digits-cnn"]["spin"],
               "servers_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "servers_http": http_stack(),
               "client": f"raw HTTP/1.1 on {'uvloop' if 'uvloop' in http_stack() else 'asyncio'}, same machine",
               "load_average_before": load}
    try:
        for concurrency in CONCURRENCY:
            floor = measure(naive_port, "/floor", bodies["digits-cnn"], concurrency)
            print(json.dumps({"benchmark": "serve_speed", "target": "http-floor", "model": None,
                              "concurrency": concurrency, **floor, "machine": machine}), flush=True)
            for name, body in bodies.items():
                path = f"/v1/models/{name}/predict"
                results = {"dlkit-serve-onnx": measure(dlkit_port, path, body, concurrency),
                           "naive-torch-eager": measure(naive_port, path, body, concurrency)}
                if concurrency in (1, 32):
                    results["dlkit-serve-onnx-max-wait-5"] = measure(wait_port, path, body, concurrency)
                if concurrency == 32 and workers > 1:
                    results[f"dlkit-serve-onnx-workers-{workers}"] = measure(many_port, path, body, concurrency)
                naive = results["naive-torch-eager"]
                for target, result in results.items():
                    line = {"benchmark": "serve_speed", "target": target, "model": name, "concurrency": concurrency,
                            **result, "ort_ms_one_row": round(own[name]["ort_ms"], 3) if target.startswith("dlkit") else None}
                    if target.startswith("dlkit"):
                        line |= {"rps_vs_naive": round(result["rps"] / naive["rps"], 2),
                                 "p99_vs_naive": round(result["p99_ms"] / naive["p99_ms"], 2)}
                    print(json.dumps({**line, "machine": machine}), flush=True)
                if concurrency in (1, 32):
                    print(json.dumps(goal(name, concurrency, results["dlkit-serve-onnx"], naive, floor, own[name])),
                          flush=True)
    finally:
        for proc in (dlkit_proc, naive_proc, wait_proc, many_proc):
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--naive", nargs="+", metavar="NAME=RUN")
    parser.add_argument("--port", type=int)
    options = parser.parse_args()
    if options.naive:
        import uvicorn

        uvicorn.run(naive_app(dict(r.split("=", 1) for r in options.naive)), host=HOST, port=options.port,
                    log_level="warning")
    else:
        main()
