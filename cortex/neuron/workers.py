"""Generation workers: the one owner of each loaded model's context.

Each loaded model has one ``GenerationWorker`` task in the neuron's nursery.
Requests reach it as ``Job``s through a bounded channel (the model's queue);
the worker takes one whenever fewer than ``model.parallel`` are running and
serves it in a child task: a thread runs the engine's token iterator, the
stop-string scan and the token limit, and hands text back through the job's
own bounded channel. An engine with ``parallel == 1`` is served one job at a
time, in turn; one with more (llama.cpp's continuous batching) decodes the
running jobs' sequences together, and the worker only dispatches.

Admission: the queue holds at most ``queue_limit`` jobs waiting for a free
slot; beyond that ``submit`` raises ``QueueFull`` (429 with Retry-After).

Refusal: an engine may refuse a request only once it sees it (a token id
outside its vocabulary, a grammar it cannot parse): it raises a 4xx
``CortexError`` before the first token. That error is the job's
``refusal``; ``Job.wait_admitted`` raises it, so the client gets a 400 and
not a 200 stream that ends in an error.

Cancellation: a job's ``scope`` covers its thread. ``Job.cancel()`` (the
client went away, or the model is being unloaded) makes the thread's next
``trio.from_thread`` call raise ``Cancelled``; the thread closes the
engine's generator, which ends just that sequence, within a token. Before
the first token the thread is inside the engine (prompt processing, for
seconds or minutes) and makes no such call: ``Job.cancel()`` then also
calls the generator's ``cancel()``, where the engine offers one (see
``LoadedModel.generate``), which ends it between two prompt chunks. A job
cancelled so ends with no event at all: ``Job.wait_admitted`` raises
``Unavailable`` for it, and nothing was sent to its client yet.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import attrs
import trio

from cortex.errors import CortexError, GenerationFailed, QueueFull, Unavailable
from cortex.harness import LoadedModel, Sampling
from cortex.neuron.stops import StopScanner

log = logging.getLogger(__name__)

#: A job whose consumer reads nothing for this long is cancelled: its
#: response never started (the client left while the head was sent) or the
#: client stopped reading. It must not hold a generation slot forever.
CONSUMER_STALL_SECONDS = 120.0

#: Why a job the worker cancelled (``GenerationWorker.close``) has no ending.
CANCELLED_BY_UNLOAD = "generation cancelled: the model is being unloaded"


@attrs.frozen
class GenerationRequest:
    """One prompt to continue. ``max_tokens`` is already clamped to the context."""

    tokens: list[int]
    sampling: Sampling
    max_tokens: int
    #: The client's stop strings: a match is reported as ``stop_sequence``.
    stops: tuple[str, ...] = ()
    #: End-of-turn strings the chat template implies.
    template_stops: tuple[str, ...] = ()


@attrs.frozen
class Delta:
    text: str


@attrs.frozen
class Done:
    finish_reason: str
    #: The client stop string that ended the output, if one did.
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    #: Seconds from the first generated token to the last.
    decode_seconds: float
    #: Seconds from the start of the job's thread to its first token.
    first_token_seconds: float | None
    #: Prompt tokens the engine did not evaluate again (its prompt cache);
    #: 0 when it says nothing or no token came.
    cached_tokens: int = 0


@attrs.frozen
class Failed:
    message: str
    #: The engine's own error when it refused the request (a 4xx), else None.
    error: CortexError | None = None


Event = Delta | Done | Failed


class Job:
    """A request on its way through a worker; the caller reads ``events``."""

    def __init__(self, request: GenerationRequest, *, buffer: int = 64) -> None:
        self.request = request
        self._send, self.events = trio.open_memory_channel[Event](buffer)
        self.scope = trio.CancelScope()
        self.started = trio.Event()
        #: Tokens generated so far; written by the job's thread.
        self.completion_tokens = 0
        #: Prompt tokens the engine has processed (all or none); written by the thread.
        self.prompt_tokens = 0
        #: Prompt tokens whose KV state the engine reused (a prompt cache hit).
        self.cached_tokens = 0
        #: Set at the first event, or when the job ends without one.
        self.admitted = trio.Event()
        #: The engine's 4xx error, when it refused the request before its first token.
        self.refusal: CortexError | None = None
        #: Whether the metrics have counted its tokens (NeuronMetrics.job_finished).
        self.counted = False
        #: The engine generator's ``cancel``, once its thread has one.
        self._interrupt: Callable[[], None] | None = None
        #: Its thread waits for the consumer to take an event (not for the engine).
        self.delivering = False
        #: Its last event (``Done`` or ``Failed``) is in its channel: its
        #: generation is over even while the worker still counts it running.
        self.finished = False

    async def wait_admitted(self) -> None:
        """Wait until the engine has taken the request: its first event, or its end.

        Raises:
          CortexError: the engine refused it (a 4xx: a token id outside the
            vocabulary, say).
        """
        await self.admitted.wait()
        if self.refusal is not None:
            raise self.refusal
        if self.ended_empty():
            raise Unavailable(CANCELLED_BY_UNLOAD, retry_after=2)

    def ended_empty(self) -> bool:
        """Whether the job's channel is closed with nothing left to read.

        A job that ran to its end always sends one: ``Done`` or ``Failed``;
        one without is a job the worker cancelled (the model is unloading).
        """
        stats = self.events.statistics()
        return stats.open_send_channels == 0 and stats.current_buffer_used == 0

    def cancel(self) -> None:
        """End the job: its thread sees ``Cancelled``, and an engine busy with
        the prompt is told to stop (the generator's ``cancel``)."""
        self.scope.cancel()
        if self._interrupt is not None:
            self._interrupt()

    def interruptible(self, interrupt: Callable[[], None] | None) -> None:
        """Called by the job's thread with its generator's ``cancel`` (or None).

        Raises:
          trio.Cancelled: the job was cancelled before this call; ``cancel``
            may have missed ``interrupt``.
        """
        self._interrupt = interrupt
        # Job.cancel cancels the scope before it reads ``_interrupt``: either
        # it sees the interrupt, or this sees the cancellation.
        trio.from_thread.check_cancelled()

    def close(self) -> None:
        """The consumer is done: cancel the generation, then close the channel.

        In this order, so that the thread sees a cancellation rather than a
        closed channel.
        """
        self.cancel()
        self.events.close()

    async def deliver(self, event: Event) -> None:
        """Hand ``event`` to the consumer (called from the job's thread)."""
        self.admitted.set()
        self.delivering = True
        try:
            with trio.move_on_after(CONSUMER_STALL_SECONDS):
                await self._send.send(event)
                if isinstance(event, Done | Failed):
                    self.finished = True
                return
        finally:
            self.delivering = False
        log.warning(
            "a consumer read nothing for %.0f s: cancelling its job", CONSUMER_STALL_SECONDS
        )
        self.cancel()
        await trio.lowlevel.checkpoint()  # delivers the Cancelled to the thread


@attrs.frozen
class WorkerStatistics:
    #: Jobs waiting for a free slot.
    queued: int
    #: Jobs being generated (at most ``parallel``).
    in_flight: int
    last_used: float | None
    tokens_generated: int
    #: Jobs the model can generate at once.
    parallel: int = 1


class GenerationWorker:
    """Dispatches one model's jobs, up to ``model.parallel`` at once.

    Start with ``nursery.start(worker.run)``.

    Args:
      model: the loaded model whose context this worker owns.
      queue_limit: jobs that may wait for a slot.
      on_finished: called (in the trio thread) with every job that ran once
        it has ended, however it ended: finished, cancelled, or left by its
        consumer. Token counts are final then; metrics count them here, so
        that a stream whose client went away is counted too.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        queue_limit: int = 64,
        on_finished: Callable[[Job], None] | None = None,
    ) -> None:
        self.model = model
        self._on_finished = on_finished
        self.parallel = max(1, int(getattr(model, "parallel", 1)))
        #: Slots: the worker takes a job from the queue only with one free.
        self.limiter = trio.CapacityLimiter(self.parallel)
        # The threads' own limiter: trio's default one is shared by every
        # to_thread call in the process and could starve generation.
        self._threads = trio.CapacityLimiter(self.parallel)
        self._queue_limit = max(0, queue_limit)
        # Room for the waiting jobs plus those about to take a free slot:
        # ``submit`` enforces the limit on the waiting ones.
        self._send, self._receive = trio.open_memory_channel[Job](self._queue_limit + self.parallel)
        self._closed = False
        self._running: set[Job] = set()
        self._cancel_all = False
        self._last_used: float | None = None
        self._tokens_generated = 0
        # The engine's progress count when last looked at, and since when
        # (monotonic) it has held still with jobs in the engine.
        self._progress: int | None = None
        self._progress_at = time.monotonic()

    def _waiting(self) -> int:
        """Jobs in the queue beyond those the free slots are about to take."""
        free = self.parallel - len(self._running)
        return max(0, self._send.statistics().current_buffer_used - free)

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            queued=self._waiting(),
            in_flight=len(self._running),
            last_used=self._last_used,
            tokens_generated=self._tokens_generated
            + sum(job.completion_tokens for job in self._running),
            parallel=self.parallel,
        )

    def stalled_secs(self) -> float:
        """Seconds the engine has worked on jobs without its progress count moving.

        0 when the count moved since the last call, when no job is in the
        engine (none running, or every one waiting for its consumer to read:
        the engine has nothing to do for it then), and when the engine does
        not count (``LoadedModel.progress`` is None). Measured from the
        last call that saw it move or idle, or from the start of the first
        job after an idle spell, whichever is later: call it now and then
        (every ``GET /models`` does).
        """
        progress = self.model.progress()
        now = time.monotonic()
        working = any(not job.delivering for job in self._running)
        if progress is None or not working or progress != self._progress:
            self._progress, self._progress_at = progress, now
            return 0.0
        return now - self._progress_at

    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
          QueueFull: the model's queue is at its limit.
          Unavailable: the model is being unloaded.
        """
        if self._closed:
            raise Unavailable(f"model {self.model.model_id!r} is unloading")
        free = self.parallel - len(self._running)
        if self._send.statistics().current_buffer_used >= free + self._queue_limit:
            raise QueueFull(
                f"the queue for model {self.model.model_id!r} is full "
                f"({self._waiting()} waiting); retry later",
                retry_after=1,
            )
        self._send.send_nowait(job)

    def close(self, *, cancel: bool) -> int:
        """Accept no more jobs; with ``cancel``, also cancel the queued and running ones.

        Returns the number of jobs cancelled: queued ones, and running ones
        whose generation was not over. A job that has handed over its last
        event (its client has the whole answer) is still running until its
        thread returns to trio; cancelling it would cut nothing.
        ``run`` returns once the queue is empty.
        """
        self._closed = True
        self._send.close()
        if not cancel:
            return 0
        self._cancel_all = True
        cancelled = self._send.statistics().current_buffer_used
        for job in self._running:
            if job.finished:
                continue
            job.cancel()
            cancelled += 1
        return cancelled

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take jobs while slots are free; return when the queue is closed and drained."""
        task_status.started()
        async with self._receive, trio.open_nursery() as nursery:
            while True:
                # A slot first, then a job: waiting jobs stay in the queue,
                # where they count against its limit and in ``queued``.
                token = object()
                await self.limiter.acquire_on_behalf_of(token)
                try:
                    job = await self._receive.receive()
                except trio.EndOfChannel:
                    self.limiter.release_on_behalf_of(token)
                    return
                except BaseException:
                    self.limiter.release_on_behalf_of(token)
                    raise
                if self._cancel_all:
                    job.cancel()
                if not self._running:
                    # Idle until now: a stall counts from here, not from the last look.
                    self._progress_at = time.monotonic()
                self._running.add(job)
                nursery.start_soon(self._serve, job, token)

    async def _serve(self, job: Job, token: object) -> None:
        try:
            async with job._send:
                with job.scope:
                    job.started.set()
                    try:
                        await trio.to_thread.run_sync(self._generate, job, limiter=self._threads)
                    except trio.Cancelled:
                        raise
                    except ConsumerGone:
                        pass
                    except Exception as exc:
                        failed = self._failure(job, exc)
                        with trio.move_on_after(1):
                            try:
                                await job._send.send(failed)
                                job.finished = True
                            except trio.BrokenResourceError:
                                pass  # nobody is listening any more
        finally:
            job.admitted.set()
            self._running.discard(job)
            self._tokens_generated += job.completion_tokens
            self._last_used = time.time()
            self.limiter.release_on_behalf_of(token)
            if self._on_finished is not None:
                self._on_finished(job)

    def _failure(self, job: Job, exc: Exception) -> Failed:
        """The event for a generation that raised ``exc``: a refusal, or a failure."""
        if isinstance(exc, CortexError) and exc.status < 500 and not job.admitted.is_set():
            job.refusal = exc
            return Failed(exc.message, error=exc)
        log.exception("generation failed for %s", self.model.model_id, exc_info=exc)
        return Failed(f"generation failed: {type(exc).__name__}: {exc}")

    def _generate(self, job: Job) -> None:
        """The decode loop; runs in a worker thread."""
        request = job.request
        scanner = StopScanner(request.stops + request.template_stops)
        emitted = 0
        finish = "length"
        started = time.perf_counter()
        first_token: float | None = None
        cached = 0

        def emit(event: Event) -> None:
            try:
                trio.from_thread.run(job.deliver, event)
            except trio.BrokenResourceError:
                # The consumer closed its end without cancelling first: it is gone.
                raise ConsumerGone from None

        generator = self.model.generate(request.tokens, request.sampling)
        try:
            job.interruptible(getattr(generator, "cancel", None))
            if request.max_tokens > 0:
                for token in generator:
                    if first_token is None:
                        first_token = time.perf_counter()
                        job.prompt_tokens = len(request.tokens)
                        cached = job.cached_tokens = getattr(token, "cached_tokens", 0)
                    emitted += 1
                    job.completion_tokens = emitted
                    text = scanner.feed(token.piece)
                    if text:
                        emit(Delta(text))
                    else:
                        trio.from_thread.check_cancelled()
                    if scanner.matched is not None:
                        finish = "stop"
                        break
                    if emitted >= request.max_tokens:
                        break
                else:
                    # An engine that was cancelled ends early: nothing to report.
                    trio.from_thread.check_cancelled()
                    # The engine ends at end-of-generation, or when the context is full.
                    full = len(request.tokens) + emitted >= self.model.n_ctx
                    finish = "length" if full else "stop"
        finally:
            job._interrupt = None
            generator.close()
        job.prompt_tokens = len(request.tokens)
        if scanner.matched is None:
            tail = scanner.flush()
            if tail:
                emit(Delta(tail))
        ended = time.perf_counter()
        stop_sequence = scanner.matched if scanner.matched in request.stops else None
        emit(
            Done(
                finish_reason=finish,
                stop_sequence=stop_sequence,
                prompt_tokens=len(request.tokens),
                completion_tokens=emitted,
                decode_seconds=ended - first_token if first_token is not None else 0.0,
                first_token_seconds=None if first_token is None else first_token - started,
                cached_tokens=cached,
            )
        )


async def collect(job: Job) -> tuple[str, Done]:
    """Read a job to its end; the whole text and how it finished.

    The job is closed on the way out, whether it ended or the caller left.
    """
    parts: list[str] = []
    try:
        async for event in job.events:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Done):
                return "".join(parts), event
            else:
                raise event.error or GenerationFailed(event.message)
    finally:
        job.close()
    # The worker closed the job without an ending: the model is being unloaded.
    raise Unavailable(CANCELLED_BY_UNLOAD)


class ConsumerGone(Exception):
    """Raised in a job's thread when its consumer has closed the channel."""


def tokens_per_second(done: Done) -> float:
    # The first token's time belongs to prompt processing; decode speed is over the rest.
    if done.completion_tokens < 2 or done.decode_seconds <= 0:
        return math.nan
    return (done.completion_tokens - 1) / done.decode_seconds
