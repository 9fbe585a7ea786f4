"""Client: the producer's API. Submit jobs, await their results (pushed by the broker, never
polled), map a function over many inputs, cancel, inspect."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from typing import Any, NamedTuple

from jobbroker.broker.errors import (
    ConnectionClosed,
    FrameTooLarge,
    JobCancelled,
    JobDead,
    JobNotFound,
    LimitExceeded,
    NotLeader,
    ResultTimeout,
    Unacknowledged,
    UnencodablePayload,
    UsageError,
    broker_error,
)
from jobbroker.broker.protocol.messages import (
    Cancel,
    DeadList,
    DeadPurge,
    DeadRequeue,
    Deliver,
    Drain,
    JobInfo,
    JobList,
    Progressed,
    QueuePurge,
    QueueSet,
    Results,
    Revoked,
    ScheduleList,
    ScheduleRemove,
    ScheduleSet,
    Stats,
    Submit,
    Watch,
)
from jobbroker.broker.protocol.rows import Outcome, ResultRow, refused_rows
from jobbroker.client.connection import Connection, Dial, dial_tcp
from jobbroker.client.link import Link
from jobbroker.client.progress import show_progress
from jobbroker.client.serializers import PlainMsgpack, Serializer

__all__ = ["Client", "ProgressReport"]

log = logging.getLogger("jobbroker.client")


_MAP_BATCH = 1000
_WATCH_BATCH = 5000
_REWATCH_BATCH = 500  # ids per watch when a new connection asks again for every outcome owed


class Client:
    """A connection to the broker for producers and admins.

    Args:
        address: "HOST:PORT" of the broker; or several, as "h1:7878,h2:7878" or a list, for
            brokers sharing one database of which one leads (README, "Standby brokers"): the
            client follows the leader. Default $JOBBROKER_CONNECT (commas too), else
            127.0.0.1:7878.
        secret: the shared secret (bytes). Default: $JOBBROKER_SECRET_FILE,
            $JOBBROKER_SECRET, then the default secret file the broker writes.
        secret_file: read the secret from this file instead.
        credential: the credential name to authenticate as; default $JOBBROKER_CREDENTIAL,
            else "default".
        tls: speak TLS: an ssl.SSLContext, or the CA file that signed the broker's
            certificate; default $JOBBROKER_TLS_CA, else plain TCP.
        name: how this client shows in the broker's logs and stats.
        reconnect_timeout: how long to keep trying to reach a broker that went away.
        wait_for_broker: keep trying (for reconnect_timeout) to reach a broker never reached
            yet; by default the first connection fails at once with BrokerUnreachable.
        serializer: turns payloads into bytes and results back (client.serializers); the
            workers must use the same. Default: PlainMsgpack, a value packed as msgpack.
        dial: how to open the byte stream to the broker (client.connection.Dial): TCP by
            default; tests join a broker in memory.

    Use as `async with Client(...) as client:`; or call connect() and close().

    Raises:
        ConfigError: no usable secret, or an unusable CA file.
    """

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        secret: bytes | str | None = None,
        secret_file: str | None = None,
        credential: str | None = None,
        tls: ssl.SSLContext | str | None = None,
        name: str = "client",
        reconnect_timeout: float = 30.0,
        serializer: Serializer | None = None,
        wait_for_broker: bool = False,
        dial: Dial = dial_tcp,
    ) -> None:
        self.serializer = serializer
        # Payloads and results are bytes on the wire (protocol version 2): this makes them.
        self._codec: Serializer = serializer if serializer is not None else PlainMsgpack()
        self._link = Link.from_settings(
            address,
            secret=secret,
            secret_file=secret_file,
            credential=credential,
            tls=tls,
            client=name,
            on_push=self._on_push,
            on_connect=self._on_connect,
            on_lost=self._on_lost,
            reconnect_timeout=reconnect_timeout,
            wait_for_broker=wait_for_broker,
            dial=dial,
        )
        self._reconnecting: asyncio.Task[None] | None = None
        self._rewatching: asyncio.Future[None] | None = None
        self._waiters: dict[int, asyncio.Future[ResultRow]] = {}  # job id -> its outcome
        self._unclaimed: dict[int, ResultRow] = {}  # outcomes pushed before anyone awaited them
        self._to_watch: list[int] = []  # result() calls of this loop turn, watched together
        self._submit_groups: dict[_SubmitOptions, _SubmitGroup] = {}  # submit() calls of this turn
        self._submitting: set[asyncio.Task[None]] = set()
        self._followers: dict[int, list[asyncio.Queue[ProgressReport]]] = {}  # progress() iterators

    async def connect(self) -> Client:
        """Connect now rather than on first use."""
        await self._link.get()
        return self

    async def close(self) -> None:
        """Close the connection. Idempotent."""
        self._link.close()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._rewatching is not None:
            self._rewatching.cancel()
        await self._link.wait_closed()
        for future in self._waiters.values():
            future.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- submitting -------------------------------------------------------------------

    async def submit(
        self,
        queue: str,
        payload: Any,
        *,
        priority: int = 0,
        delay: float = 0.0,
        max_attempts: int | None = None,
        lease: float | None = None,
        backoff: float | None = None,
        key: str | None = None,
        timeout: float | None = None,
        result_ttl: float | None = None,
        max_backoff: float | None = None,
        after: Sequence[int] | None = None,
        after_policy: str = "done",
    ) -> int:
        """Submit one job.

        Args:
            queue: queue name (created on first use).
            payload: any msgpack value; the handler's argument.
            priority: higher runs first.
            delay: seconds before the job may run.
            max_attempts: attempts before a failing job goes dead (broker default 3). An
                attempt counts when a worker starts the job.
            lease: kept for compatibility; a live worker keeps its jobs however long they
                run (docs/protocol.md, "Leases"). Use `timeout` to bound run time.
            backoff: first retry delay in seconds, doubled each attempt (broker default 1).
            key: idempotency key: a repeated submit with the same key returns the first id,
                and a submit lost with its connection is retried safely.
            timeout: seconds one attempt may run (None: the worker's default, else no
                limit); an attempt over it fails with TimeLimitExceeded and is retried.
            result_ttl: seconds the result is kept once the job ends (None: the broker's
                --result-ttl; at most its --max-result-ttl).
            max_backoff: the longest retry delay (None: the broker's, 300 s).
            after: ids of existing jobs this one runs after: it waits (state "waiting") until
                they have all ended, then runs with their results (current_job().parent_results,
                in this order); with after_policy "done" (the default) it is cancelled when one
                of them ends dead or cancelled, with "always" it runs anyway.

        Returns:
            The job id.

        Raises:
            QueueFull: the queue is at its pending limit.
            InvalidRequest: a bad argument.
            Unacknowledged: without `key`, the connection was lost (the broker died, a standby
                took over) after the submit was sent and before it was acknowledged: the job
                may or may not have been stored. With `key` the submit is sent again instead.
        """
        try:  # the common case inline: a submit() per job is the per-job hot path
            data: Any = self._codec.dumps(payload)
        except (TypeError, ValueError, OverflowError):
            data = None
        if type(data) is not bytes:
            data = self._serialized([payload])[0]  # raises UnencodablePayload, or converts
        options = _SubmitOptions.of(
            queue,
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            lease=lease,
            backoff=backoff,
            timeout=timeout,
            result_ttl=result_ttl,
            max_backoff=max_backoff,
            after=after,
            after_policy=after_policy,
        )
        group = self._submit_groups.get(options)
        if group is None:
            if not self._submit_groups:
                asyncio.get_running_loop().call_soon(self._send_submit_groups)
            group = self._submit_groups[options] = _SubmitGroup()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        group.add(data, key, future)
        return await future

    def _send_submit_groups(self) -> None:
        """Single submits of one loop turn with the same queue and options travel together in
        one frame (as the writes of a turn do), each call still getting its own id. The
        broker takes a frame all or none, so a refusal (queue full) reaches the whole group."""
        groups, self._submit_groups = self._submit_groups, {}
        for options, group in groups.items():
            task = asyncio.ensure_future(self._submit_group(options, group))
            self._submitting.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._submitting.discard)

    async def _submit_group(self, options: _SubmitOptions, group: _SubmitGroup) -> None:
        """Submit a group; a payload that cannot be encoded fails its own submit() call only,
        and the others go again without it."""
        try:
            ids = await self._submit(options, group.payloads, group.keys())
        except UnencodablePayload as exc:
            good = _SubmitGroup()
            for index, (payload, key, future) in enumerate(
                zip(group.payloads, group.idempotency_keys, group.futures, strict=True)
            ):
                if index in exc.indexes:
                    if not future.done():
                        future.set_exception(UnencodablePayload(f"the payload {exc.reasons[index]}"))
                else:
                    good.add(payload, key, future)
            if good.payloads:
                await self._submit_group(options, good)
        except BaseException as exc:
            group.settle(exc, [])
            if not isinstance(exc, Exception):
                raise
        else:
            group.settle(None, ids)

    async def submit_many(
        self,
        queue: str,
        payloads: Iterable[Any],
        *,
        priority: int = 0,
        delay: float = 0.0,
        max_attempts: int | None = None,
        lease: float | None = None,
        backoff: float | None = None,
        keys: Sequence[str | None] | None = None,
        timeout: float | None = None,
        result_ttl: float | None = None,
        max_backoff: float | None = None,
        after: Sequence[int] | None = None,
        after_policy: str = "done",
    ) -> list[int]:
        """Submit many jobs in one frame, all or none. Options as submit(); `keys` gives each
        job an idempotency key (or None). Returns the job ids in order.

        Raises:
            UnencodablePayload: a payload cannot be encoded (nothing was submitted).
            Unacknowledged: as submit(), unless every job has a key (then it is resent).
        """
        options = _SubmitOptions.of(
            queue,
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            lease=lease,
            backoff=backoff,
            timeout=timeout,
            result_ttl=result_ttl,
            max_backoff=max_backoff,
            after=after,
            after_policy=after_policy,
        )
        return await self._submit(options, self._serialized(list(payloads)), keys)

    def _serialized(self, payloads: list[Any]) -> list[bytes]:
        """The payloads as the serializer makes them: the opaque bytes the broker holds.

        Raises:
            UnencodablePayload: naming the first payload it cannot encode (and, in `reasons`,
                every one).
        """
        dumps = self._codec.dumps
        try:
            encoded = [dumps(payload) for payload in payloads]
        except (TypeError, ValueError, OverflowError) as exc:
            raise _unencodable(payloads, dumps, self.serializer is None) from exc
        for index, data in enumerate(encoded):
            if type(data) is not bytes:  # the wire carries a payload as msgpack bin
                if not isinstance(data, bytes | bytearray | memoryview):
                    reason = f"is made {type(data).__name__} by the serializer, not bytes"
                    raise UnencodablePayload(f"payload {index} {reason}", {index: reason})
                encoded[index] = bytes(data)
        return encoded

    async def _submit(
        self,
        options: _SubmitOptions,
        payloads: list[Any],
        keys: Sequence[str | None] | None,
        *,
        watch: bool = False,
    ) -> list[int]:
        try:
            reply = await self._link.call(
                Submit,
                # Resending is safe only when every job carries an idempotency key.
                retry=keys is not None and all(k is not None for k in keys),
                queue=options.queue,
                payloads=payloads,
                priority=options.priority,
                delay=options.delay,
                max_attempts=options.max_attempts,
                lease=None if options.lease is None else float(options.lease),
                backoff=None if options.backoff is None else float(options.backoff),
                keys=None if keys is None else list(keys),
                watch=watch,
                timeout=None if options.timeout is None else float(options.timeout),
                result_ttl=None if options.result_ttl is None else float(options.result_ttl),
                max_backoff=None if options.max_backoff is None else float(options.max_backoff),
                after=None if options.after is None else list(options.after),
                after_policy=options.after_policy,
            )
        except Unacknowledged as exc:
            # Without keys a resend could store the jobs twice: say so rather than guess.
            raise Unacknowledged(
                f"the connection to the broker was lost before it acknowledged the submit of "
                f"{len(payloads)} job(s) to queue {options.queue!r}: they may or may not have been stored "
                "(give each job an idempotency key, key= or keys=, to have such a submit resent safely)",
                exc.cause,
            ) from None
        except FrameTooLarge as exc:
            raise LimitExceeded(
                f"{len(payloads)} payloads make a frame of {exc.size} bytes; the broker takes {exc.limit}: "
                "submit fewer at a time"
            ) from None
        except (TypeError, ValueError, OverflowError) as exc:
            # Payloads are bytes by now: msgpack refused an option (the frame was not sent).
            raise UnencodablePayload("the request cannot be encoded") from exc
        return list(reply["job_ids"])

    # --- results ----------------------------------------------------------------------

    async def result(self, job_id: int, timeout: float | None = None) -> Any:
        """Wait for a job's result; the broker pushes it when the job completes.

        Returns:
            The handler's return value.

        Raises:
            JobDead: the job failed max_attempts times (`.error` has the last failure).
            JobCancelled: the job was cancelled.
            JobNotFound: no such job, or its result has expired.
            ResultTimeout: no result within `timeout` seconds (the job goes on).
        """
        future = await self._outcome(job_id)
        if not future.done():
            await _settled(future, timeout)
            if not future.done():
                raise ResultTimeout(f"no result for job {job_id} within {timeout}s")
        return _unwrap(future.result(), self._codec)

    async def _outcome(self, job_id: int) -> asyncio.Future[ResultRow]:
        """The future of a job's outcome, watching the job if nobody does yet."""
        future = self._waiters.get(job_id)
        if future is not None:
            return future
        future = asyncio.get_running_loop().create_future()
        outcome = self._unclaimed.pop(job_id, None)
        if outcome is not None:
            future.set_result(outcome)
            return future
        self._waiters[job_id] = future
        if self._link.current is None:
            await self._link.get()  # on_connect watches every waiter
        else:
            self._watch_soon(job_id)
        return future

    async def progress(self, job_id: int) -> AsyncGenerator[ProgressReport, None]:
        """Follow a job's progress reports (`Job.report_progress` in its handler) until it
        ends. Ends without error whatever the outcome: `result()` says how it ended.

            async for report in client.progress(job_id):
                print(f"{report.fraction:.0%} {report.message}")
        """
        reports: asyncio.Queue[ProgressReport] = asyncio.Queue()
        self._followers.setdefault(job_id, []).append(reports)
        try:
            finished = await self._outcome(job_id)
            while not finished.done():
                next_report = asyncio.ensure_future(reports.get())
                await asyncio.wait((next_report, finished), return_when=asyncio.FIRST_COMPLETED)
                if next_report.done():
                    yield next_report.result()
                else:
                    next_report.cancel()
            while not reports.empty():
                yield reports.get_nowait()
        finally:
            followers = self._followers.get(job_id, [])
            if reports in followers:
                followers.remove(reports)
            if not followers:
                self._followers.pop(job_id, None)

    async def map(
        self,
        queue: str,
        payloads: Iterable[Any],
        *,
        timeout: float | None = None,
        priority: int = 0,
        max_attempts: int | None = None,
        lease: float | None = None,
        batch_size: int = _MAP_BATCH,
        progress: bool = False,
        job_timeout: float | None = None,
    ) -> list[Any]:
        """Submit one job per payload and return their results in order. Submits go in
        batches of `batch_size`; results are pushed as the jobs complete. With progress=True,
        a progress bar of the results on standard error. `timeout` bounds the whole call;
        `job_timeout` is each job's time limit (submit's `timeout`).

        Raises:
            JobDead, JobCancelled: for the first job that did not complete.
            ResultTimeout: not all results arrived within `timeout` seconds.
        """
        payloads = self._serialized(list(payloads))
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ResultRow]] = []
        options = _SubmitOptions.of(
            queue, priority=priority, max_attempts=max_attempts, lease=lease, timeout=job_timeout
        )
        try:
            async with asyncio.timeout(timeout):
                submits = [
                    self._submit(options, payloads[i : i + batch_size], None, watch=True)
                    for i in range(0, len(payloads), batch_size)
                ]
                for ids in await asyncio.gather(*submits):
                    for job_id in ids:
                        future = self._waiters.get(job_id)
                        if future is None:
                            future = self._waiters[job_id] = loop.create_future()
                            outcome = self._unclaimed.pop(job_id, None)
                            if outcome is not None:
                                future.set_result(outcome)
                                del self._waiters[job_id]
                        futures.append(future)
                # In order: results come in batches, so most of these awaits find their future
                # done and do not suspend.
                total = len(futures)
                for index, future in enumerate(futures, 1):
                    if not future.done():
                        if progress:
                            show_progress("results", index - 1, total)
                        await _settled(future, None)
                if progress:
                    show_progress("results", total, total)
        except TimeoutError:
            done = sum(1 for f in futures if f.done())
            raise ResultTimeout(f"{done} of {len(payloads)} results within {timeout}s") from None
        return [_unwrap(future.result(), self._codec) for future in futures]

    def _watch_soon(self, job_id: int) -> None:
        """Watch jobs in one request per loop turn, however many result() calls asked."""
        if not self._to_watch:
            asyncio.get_running_loop().call_soon(self._send_watches)
        self._to_watch.append(job_id)

    def _send_watches(self) -> None:
        job_ids, self._to_watch = self._to_watch, []
        connection = self._link.current
        if connection is not None:  # else the reconnect watches every waiter
            _watch_all(connection, job_ids)

    def _on_connect(self, connection: Connection) -> None:
        # Outcomes owed to us on a lost connection are asked for again: in batches, each sent
        # once the broker has answered the one before, rather than all at once (the broker
        # reads the next only as we take what it pushes: docs/protocol.md, "Flow control").
        if self._waiters:
            self._rewatching = asyncio.ensure_future(_rewatch(connection, list(self._waiters)))

    def _on_lost(self, reason: ConnectionClosed) -> None:
        # Someone awaits results that only a live connection can bring: reconnect now rather
        # than on the next call.
        if self._waiters and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = asyncio.ensure_future(self._reconnect_for_waiters())

    async def _reconnect_for_waiters(self) -> None:
        try:
            await self._link.get()  # on_connect watches every waiter again
        except Exception as exc:
            failure = exc if isinstance(exc, ConnectionClosed) else ConnectionClosed("cannot reconnect", exc)
            waiters, self._waiters = self._waiters, {}
            for future in waiters.values():
                if not future.done():
                    future.set_exception(failure)

    def _on_push(self, message: Deliver | Results | Progressed | Revoked) -> None:
        if isinstance(message, Progressed):
            for job_id, fraction, text in message.items:
                for reports in self._followers.get(job_id, ()):
                    reports.put_nowait(ProgressReport(fraction, text))
            return
        if not isinstance(message, Results):
            return
        waiters = self._waiters
        for outcome in message.items:
            future = waiters.pop(outcome.job_id, None)
            if future is None:
                self._unclaimed[outcome.job_id] = outcome
            elif not future.done():
                future.set_result(outcome)

    # --- managing jobs ----------------------------------------------------------------

    async def cancel(self, job_id: int) -> None:
        """Cancel a job that has not finished. A running job's worker is told at once: a
        coroutine handler is cancelled, a process handler killed, a thread handler sees
        `current_job().lease_lost`; its answer is discarded.

        Raises:
            JobNotFound: no such job.
            InvalidState: the job has finished already.
        """
        await self.cancel_many([job_id], raise_on_refusal=True)

    async def cancel_many(self, job_ids: Iterable[int], *, raise_on_refusal: bool = False) -> dict[int, str]:
        """Cancel jobs; returns {job_id: error code} for those that could not be cancelled."""
        ids = list(job_ids)
        reply = await self._link.call(Cancel, job_ids=ids)
        refused = {ids[row.item]: row.code for row in refused_rows(reply)}
        if raise_on_refusal and refused:
            job_id, code = next(iter(refused.items()))
            raise broker_error(code, f"job {job_id} cannot be cancelled ({code})")
        return refused

    async def job(self, job_id: int) -> dict[str, Any]:
        """Everything the broker knows of a job: state, attempts, last error, result.

        Raises:
            JobNotFound: no such job, or expired.
        """
        reply = await self._link.call(JobInfo, job_id=job_id)
        return self._readable(dict(reply["job"]))

    def _readable(self, job: dict[str, Any]) -> dict[str, Any]:
        """A job map of a reply with its payload and result read by the serializer; a value it
        cannot read (another serializer's) is left as the bytes the broker holds."""
        for name in ("payload", "result"):
            value = job.get(name)
            if type(value) is bytes:
                try:
                    job[name] = self._codec.loads(value)
                except Exception:
                    pass  # shown as bytes: this is a report, not the job's consumer
        return job

    async def stats(self) -> dict[str, Any]:
        """Per-queue counts and rates, and the connected workers."""
        return await self._link.call(Stats)

    async def jobs(self, queue: str, state: str, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """A page of a queue's jobs in `state` ("pending", "delayed", "running" or "dead"), by
        id, those after `after` (the last id of the previous page); without payloads. A
        producer sees only its own jobs.

        Raises:
            InvalidRequest: an unknown state, or a limit outside 1..1000.
        """
        reply = await self._link.call(JobList, queue=queue, state=state, after=after, limit=limit)
        return list(reply["jobs"])

    async def pause(self, queue: str) -> dict[str, Any]:
        """Stop delivering the queue's jobs, on every worker (submits are still taken); jobs
        already delivered run on. Admins only; durable. Returns the queue's settings."""
        return await self._link.call(QueueSet, queue=queue, paused=True)

    async def resume(self, queue: str) -> dict[str, Any]:
        """Deliver the queue's jobs again after pause(). Returns the queue's settings."""
        return await self._link.call(QueueSet, queue=queue, paused=False)

    async def set_queue(
        self, queue: str, *, concurrency: int | None = None, rate: float | None = None
    ) -> dict[str, Any]:
        """Limit a queue, across every worker: at most `concurrency` of its jobs held by
        workers at once, at most `rate` deliveries a second (0: no limit; None: unchanged).
        Admins only; durable. Returns the queue's settings (paused, concurrency, rate)."""
        return await self._link.call(
            QueueSet,
            queue=queue,
            concurrency=concurrency,
            rate=None if rate is None else float(rate),
        )

    async def schedule(
        self,
        name: str,
        queue: str,
        payload: Any = None,
        *,
        cron: str | None = None,
        every: float | None = None,
        tz: str = "UTC",
        catch_up: bool = True,
        **options: Any,
    ) -> dict[str, Any]:
        """Add or replace a periodic job, kept by the broker (admins only; durable): each tick
        of `cron` (5 fields, in time zone `tz`) or of `every` seconds submits one job of
        `payload` to `queue`, exactly once per tick (its idempotency key names the tick). A tick
        missed while the broker was down runs once when it starts, unless catch_up=False.
        `options` are submit options (priority, max_attempts, backoff, timeout, result_ttl,
        max_backoff). Returns the schedule (with its next tick, Unix time)."""
        return await self._link.call(
            ScheduleSet,
            name=name,
            queue=queue,
            payload=self._serialized([payload])[0],
            cron=cron,
            every=None if every is None else float(every),
            tz=tz,
            catch_up=catch_up,
            options=options or None,
        )

    async def unschedule(self, name: str) -> bool:
        """Remove a periodic job; returns whether there was one."""
        return bool((await self._link.call(ScheduleRemove, name=name))["removed"])

    async def schedules(self) -> list[dict[str, Any]]:
        """Every periodic job, with its last and next tick (Unix time)."""
        return [self._readable(dict(s)) for s in (await self._link.call(ScheduleList))["schedules"]]

    async def purge_queue(self, queue: str) -> int:
        """Cancel every pending and delayed job of a queue (admins only). Returns how many."""
        reply = await self._link.call(QueuePurge, queue=queue)
        return int(reply["purged"])

    async def dead_letters(self, queue: str, limit: int = 100) -> list[dict[str, Any]]:
        """The queue's dead jobs, oldest first, with their last errors."""
        reply = await self._link.call(DeadList, queue=queue, limit=limit)
        return [self._readable(dict(job)) for job in reply["jobs"]]

    async def drain(self, *, on: bool = True) -> int:
        """Stop the broker delivering jobs (on=False: start again); jobs already taken run to
        their end. Admins only. Returns how many jobs are in flight."""
        reply = await self._link.call(Drain, on=on)
        return int(reply["in_flight"])

    async def purge_dead(self, queue: str, job_ids: Iterable[int] | None = None) -> int:
        """Forget dead jobs (all of the queue's, or those named). Returns how many."""
        reply = await self._link.call(DeadPurge, queue=queue, job_ids=None if job_ids is None else list(job_ids))
        return int(reply["purged"])

    async def requeue_dead(self, queue: str, job_ids: Iterable[int] | None = None) -> int:
        """Move dead jobs (all of the queue's, or those named) back to pending. Returns how many."""
        reply = await self._link.call(DeadRequeue, queue=queue, job_ids=None if job_ids is None else list(job_ids))
        return int(reply["requeued"])


def _watch_all(connection: Connection, job_ids: list[int]) -> None:
    # In requests under the broker's batch limit (10,000 ids by default).
    for start in range(0, len(job_ids), _WATCH_BATCH):
        connection.request_nowait(Watch, job_ids=job_ids[start : start + _WATCH_BATCH])


async def _rewatch(connection: Connection, job_ids: list[int]) -> None:
    for start in range(0, len(job_ids), _REWATCH_BATCH):
        try:
            await connection.request(Watch, job_ids=job_ids[start : start + _REWATCH_BATCH])
        except (ConnectionClosed, NotLeader):
            return  # the next connection (to the leader) asks again
        except Exception as exc:  # a refusal: logged, the waiters keep waiting (a timeout ends them)
            log.warning("watching %d jobs again failed: %s", len(job_ids), exc)
            return


class ProgressReport(NamedTuple):
    """How far a running job has got, as its handler said."""

    fraction: float  # 0.0 to 1.0
    message: str


class _SubmitOptions(NamedTuple):
    """A submit's queue and job options: submits of one loop turn that share them travel in
    one frame."""

    queue: str
    priority: int
    delay: float
    max_attempts: int | None
    lease: float | None
    backoff: float | None
    timeout: float | None
    result_ttl: float | None
    max_backoff: float | None
    after: tuple[int, ...] | None
    after_policy: str

    @classmethod
    def of(
        cls,
        queue: str,
        *,
        priority: int = 0,
        delay: float = 0.0,
        max_attempts: int | None = None,
        lease: float | None = None,
        backoff: float | None = None,
        timeout: float | None = None,
        result_ttl: float | None = None,
        max_backoff: float | None = None,
        after: Sequence[int] | None = None,
        after_policy: str = "done",
    ) -> _SubmitOptions:
        """The options as submit(), submit_many() and map() take them, by name (hashable: a
        group's key); defaults as submit()'s."""
        return cls(
            queue,
            priority,
            float(delay),
            max_attempts,
            lease,
            backoff,
            timeout,
            result_ttl,
            max_backoff,
            None if after is None else tuple(after),
            after_policy,
        )


class _SubmitGroup:
    """The submit() calls of one loop turn that share a queue and options."""

    __slots__ = ("futures", "has_keys", "idempotency_keys", "payloads")

    def __init__(self) -> None:
        self.payloads: list[Any] = []
        self.idempotency_keys: list[str | None] = []
        self.futures: list[asyncio.Future[int]] = []
        self.has_keys = False

    def add(self, payload: Any, key: str | None, future: asyncio.Future[int]) -> None:
        self.payloads.append(payload)
        self.idempotency_keys.append(key)
        self.futures.append(future)
        self.has_keys = self.has_keys or key is not None

    def keys(self) -> list[str | None] | None:
        return self.idempotency_keys if self.has_keys else None

    def settle(self, error: BaseException | None, ids: list[int]) -> None:
        for index, future in enumerate(self.futures):
            if future.done():
                continue
            if isinstance(error, asyncio.CancelledError):
                future.cancel()
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(ids[index])


def _unencodable(payloads: list[Any], dumps: Callable[[Any], bytes], default: bool) -> UnencodablePayload:
    """Which payloads the serializer cannot encode, and why (the slow path, after a failure)."""
    reasons: dict[int, str] = {}
    hint = "; give Client(serializer=...) for such types" if default else ""
    for index, payload in enumerate(payloads):
        try:
            dumps(payload)
        except (TypeError, ValueError, OverflowError) as exc:
            reasons[index] = f"cannot be encoded ({exc}){hint}"
    if not reasons:  # it failed once and not again: say so rather than nothing
        return UnencodablePayload("a payload cannot be encoded")
    first = min(reasons)
    return UnencodablePayload(f"payload {first} {reasons[first]}", reasons)


def _unwrap(outcome: ResultRow, codec: Serializer) -> Any:
    """A job's result as the serializer reads it, or the error its outcome means."""
    job_id, state = outcome.job_id, outcome.state
    if state == Outcome.DONE:
        if outcome.result is None:  # a broker that kept no result: not one of ours
            raise UsageError(f"job {job_id} is done but the broker sent no result")
        try:
            return codec.loads(outcome.result)
        except Exception as exc:
            raise UsageError(f"job {job_id}'s result cannot be read by this client's serializer: {exc}") from exc
    if state == Outcome.DEAD:
        raise JobDead(job_id, outcome.error)
    if state == Outcome.CANCELLED:
        raise JobCancelled(job_id)
    if state == Outcome.UNKNOWN:
        raise JobNotFound(f"job {job_id} is unknown (never submitted, or its result expired)")
    raise UsageError(f"job {job_id} ended in unexpected state {state!r}")


async def _settled(shared: asyncio.Future[Any], timeout: float | None) -> None:
    """Wait until `shared` is done or `timeout` seconds pass. Other callers may wait on the same
    future: being cancelled, or timing out, leaves it alone. (asyncio.wait does the same at about
    twice the cost: a task per awaitable, sets, a second waiter.)"""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    shared.add_done_callback(wake)
    handle = None if timeout is None else loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        shared.remove_done_callback(wake)
        if handle is not None:
            handle.cancel()
