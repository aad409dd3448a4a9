"""Request batching: one worker per model gathers concurrent requests into one model call.

A batch is whatever is waiting when the worker is free, up to `max_batch` rows: under load requests
pile up while the model runs the previous batch, so batches form without delaying a lone request.
`max_wait_ms` (0 by default) lets the worker also wait that long for more. The model runs in the
worker's own thread (the event loop stays free, and calls to one model never overlap); a request may
hand over its inputs unprepared (`submit_later`), to be prepared in that same thread just before the
batch runs: one hand-off per batch instead of one to a thread pool per request and one more to the
model. With `inline` (a backend nothing else calls from the model's thread), a batch expected to take
less than the interpreter's switch interval (5 ms) runs in the event loop itself: preparing inputs is
Python, which holds the GIL, so a thread would not give the loop the CPU sooner, and handing a quick
batch over and back cost more than the batch (a small model's throughput rose a tenth). The expectation
is the time per row measured over recent batches. Work that is the same for every row is done once
per batch: `prepare` (a table's normalisation) over the batch's rows before the model, and `finish`
(logits to answers) after it; both are row by row, so a row's result does not depend on its batch.
The queue is bounded: a full one refuses at once (503 with Retry-After). A request still waiting at
its deadline answers 504 and is dropped before it reaches the model. Rows are independent in eval
mode, so a request's answer does not depend on its batch-mates (to float rounding; tested to 1e-6).
"""
from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from dlkit.serve.limits import RETRY_AFTER_S, ClientError

T = TypeVar("T")


class Backend(Protocol):
    """What runs a model: a prepared batch in, float32 logits (N, outputs) out, on the CPU."""

    def __call__(self, x: Tensor) -> Tensor: ...


class TorchBackend:
    """The run's PyTorch model in eval mode, without autograd (grad mode is per thread: set here)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.model(x).float().cpu()


@dataclass
class _Job:
    x: Tensor | None  # the rows, prepared; or
    make: Callable[[], tuple[Tensor, Any]] | None  # what prepares them (and something to hand back beside the logits)
    rows: int  # rows it holds (for `make`: what it is expected to give), to fill a batch
    deadline: float
    future: asyncio.Future[Any]


class Batcher:
    """One model's queue and worker. `submit(x)` answers the logits of x's rows (with `prepare`, x as it
    takes them; with `finish`, what it makes of their logits: one answer per row)."""

    def __init__(self, name: str, backend: Backend, *, max_batch: int = 32, max_wait_ms: float = 0,
                 queue_limit: int = 256, timeout_s: float = 10.0,
                 observe: Callable[[int], None] | None = None, inline: bool = False,
                 prepare: Callable[[Tensor], Tensor] | None = None,
                 finish: Callable[[Tensor], Sequence[Any]] | None = None) -> None:
        self.name = name
        self.backend = backend
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.timeout_s = timeout_s
        self.observe = observe or (lambda size: None)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_limit)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix=f"dlkit-{name}")  # the model's only thread
        self.task: asyncio.Task[None] | None = None
        self.carry: _Job | None = None  # a job that did not fit the last batch: it opens the next
        self.inline = inline  # whether a quick batch may run in the event loop (see the module's note)
        self.prepare, self.finish = prepare, finish  # once per batch, before and after the model
        self.row_s = math.inf  # seconds per row of recent batches (prepared and run); unknown at first

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; requests still queued answer 503."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        waiting = [self.carry] if self.carry else []
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        for job in waiting:
            if not job.future.done():
                job.future.set_exception(ClientError(503, "the server is shutting down; retry on another instance"))
        self.thread.shutdown(wait=True, cancel_futures=True)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the model's thread (explanations share the model with the batches)."""
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    async def submit(self, x: Tensor) -> Tensor:
        """Queue x (rows of one request) and wait for its logits; 503 if the queue is full, 504 past
        the deadline (the job is then dropped unrun if it has not started)."""
        return await self._submit(x, None, len(x))

    async def submit_later(self, make: Callable[[], tuple[Tensor, T]], rows: int) -> tuple[Tensor, T]:
        """Queue a request whose rows `make()` prepares, in the model's thread when its batch is run:
        (its logits, what `make` gave beside its rows). `rows` is how many it is expected to give (a batch
        is filled by it; a batch that turns out larger runs in chunks of max_batch). What `make` raises
        is this request's answer alone; 503 and 504 as `submit`."""
        return await self._submit(None, make, rows)

    async def _submit(self, x: Tensor | None, make: Callable[[], tuple[Tensor, Any]] | None, rows: int) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(x, make, rows, time.monotonic() + self.timeout_s, loop.create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ClientError(503, f"model {self.name} has {self.queue.maxsize} requests waiting; retry shortly",
                              {"Retry-After": str(RETRY_AFTER_S)}) from None
        # the deadline is one timer on the job's own future (asyncio.wait_for would add a task and a shield
        # per request): past it the future answers 504, and the worker skips a job whose future is done
        expire = loop.call_later(self.timeout_s, self._expire, job.future)
        try:
            return await job.future
        finally:
            expire.cancel()

    def _expire(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            future.set_exception(ClientError(504, f"model {self.name} did not answer within {self.timeout_s:g} s; "
                                                  "the server is overloaded, retry later"))

    def qsize(self) -> int:
        """Requests waiting for the model (not counting the batch it is running)."""
        return self.queue.qsize() + (self.carry is not None)

    async def _work(self) -> None:
        while True:
            jobs = await self._gather()
            if not jobs:
                continue
            try:
                if self.inline and self.row_s * sum(job.rows for job in jobs) < sys.getswitchinterval():
                    answers = self._answer(jobs)
                else:
                    answers = await self.in_thread(self._answer, jobs)
            except Exception as exc:  # a bug in the model call: each request answers it, the worker lives on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, (ok, value) in zip(jobs, answers):
                if not job.future.done():
                    if ok:
                        job.future.set_result(value)
                    else:
                        job.future.set_exception(value)

    def _answer(self, jobs: list[_Job]) -> list[tuple[bool, Any]]:
        """In the model's thread (a quick batch: the event loop's): each job's rows (prepared now when it
        came unprepared; a job whose preparation fails gets its exception), one model call over them all,
        each job's share of the logits (or of `finish`'s answers): (True, answer) or (False, exception)
        per job."""
        started = time.perf_counter()
        xs: list[Tensor] = []
        answers: list[tuple[bool, Any]] = []
        for job in jobs:
            if job.make is None:
                xs.append(job.x)
                answers.append((True, None))
                continue
            try:
                x, extra = job.make()
            except Exception as exc:  # this request's bad input (or a bug preparing it): its answer alone
                answers.append((False, exc))
                continue
            xs.append(x)
            answers.append((True, extra))
        if not xs:
            return answers
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        logits = self._run(x if self.prepare is None else self.prepare(x))
        out = logits if self.finish is None else self.finish(logits)
        if len(logits):
            took = (time.perf_counter() - started) / len(logits)
            self.row_s = took if math.isinf(self.row_s) else 0.75 * self.row_s + 0.25 * took
        start, rows = 0, iter(xs)
        for i, (ok, extra) in enumerate(answers):
            if ok:
                n = len(next(rows))
                mine = out[start : start + n]
                start += n
                answers[i] = (True, mine if jobs[i].make is None else (mine, extra))
        return answers

    def _run(self, x: Tensor) -> Tensor:
        """The backend over x, in chunks of at most max_batch rows (a large request runs alone)."""
        if len(x) <= self.max_batch:
            self.observe(len(x))
            return self.backend(x)
        outs = []
        for start in range(0, len(x), self.max_batch):
            chunk = x[start : start + self.max_batch]
            self.observe(len(chunk))
            outs.append(self.backend(chunk))
        return torch.cat(outs)

    async def _gather(self) -> list[_Job]:
        """The next batch: the first live job, then every job already waiting, then (with max_wait) those
        arriving before max_wait has passed, up to max_batch rows."""
        jobs: list[_Job] = []
        rows = 0
        first, self.carry = self.carry or await self.queue.get(), None
        if self._live(first):
            jobs, rows = [first], first.rows
        until = time.monotonic() + self.max_wait
        while rows < self.max_batch:
            try:
                job = self.queue.get_nowait()  # waiting already: no delay
            except asyncio.QueueEmpty:
                left = until - time.monotonic()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), left)
                except TimeoutError:
                    break
            if not self._live(job):
                continue
            if jobs and rows + job.rows > self.max_batch:
                self.carry = job  # no room: it opens the next batch
                break
            jobs.append(job)
            rows += job.rows
        return jobs

    @staticmethod
    def _live(job: _Job) -> bool:
        """Whether a job still wants an answer: a cancelled (timed-out) one or one past its deadline is dropped."""
        if job.future.done():
            return False
        if time.monotonic() > job.deadline:
            job.future.set_exception(ClientError(504, "the request waited past its deadline; retry later"))
            return False
        return True
