"""The client side's commands of `jobbroker` (composed with the broker's in jobbroker/cli.py):
worker, submit, stats, top, dead, drain, job, cancel, queue, schedule; and the exit status of
each outcome (README, "Command line"). Imports of the broker package: its protocol and errors
only, as the rest of client/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, Protocol

from jobbroker.broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigError,
    ConnectionClosed,
    JobbrokerError,
    JobError,
    ProtocolError,
    ResultTimeout,
    StorageError,
    UsageError,
)
from jobbroker.client.output import controls_text, error_text, format_stats, table, when
from jobbroker.client.settings import default_address

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_TIMED_OUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "add_commands",
    "exit_status",
    "format_stats",
]

log = logging.getLogger("jobbroker")

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_TIMED_OUT = 5
EXIT_INTERRUPTED = 130


def exit_status(exc: BaseException) -> tuple[int | None, str]:
    """The exit status and the message for an exception that ended a command (None: a bug,
    let it show its traceback)."""
    if isinstance(exc, ConfigError | StorageError | UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, AuthenticationFailed) or (
        isinstance(exc, ConnectionClosed) and isinstance(exc.cause, AuthenticationFailed)
    ):
        return EXIT_REFUSED, f"the broker refused our credentials ({exc}); check the secret or --credential"
    if isinstance(exc, ResultTimeout | TimeoutError):
        return EXIT_TIMED_OUT, str(exc) or "timed out"
    if isinstance(exc, ConnectionClosed | ProtocolError):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, BrokerError):
        return EXIT_REFUSED, f"the broker refused: {exc}"
    if isinstance(exc, JobError):
        return EXIT_JOB_FAILED, str(exc)
    if isinstance(exc, JobbrokerError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, OSError):
        return EXIT_UNREACHABLE, f"cannot reach the broker: {exc.strerror or exc}"
    return None, ""


class AddCommand(Protocol):
    """Adds a subcommand to `jobbroker` (with the flags every command has) and returns its
    parser: jobbroker/cli.py's, as broker/cli.py's AddCommand."""

    def __call__(
        self, name: str, run: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser: ...


def add_commands(command: AddCommand) -> None:
    """Add the client side's commands, each with the flags of a client (--connect and the rest)."""
    default_connect = default_address()

    def client_command(name: str, run: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = command(name, run, help_text)
        sub.add_argument(
            "--connect",
            default=default_connect,
            help=(
                "broker HOST:PORT, or several separated by commas (brokers of which one leads: "
                f"follow it) ($JOBBROKER_CONNECT, else 127.0.0.1:$JOBBROKER_PORT; now {default_connect})"
            ),
        )
        sub.add_argument(
            "--credential", default=None, help="credential name (default $JOBBROKER_CREDENTIAL, else default)"
        )
        sub.add_argument("--tls-ca", default=None, help="CA file: speak TLS, verify the broker against it")
        sub.add_argument(
            "--wait-for-broker",
            action="store_true",
            help="keep trying to reach a broker that is not up yet (else fail at once)",
        )
        return sub

    worker = client_command("worker", _worker, "run a worker on a handler")
    worker.add_argument(
        "handler", help="module:function to run on each job's payload, or a module (or module:task) of @task functions"
    )
    worker.add_argument(
        "--queue", action="append", default=None, help="queue to take jobs from (repeatable; tasks: their queues)"
    )
    worker.add_argument("--concurrency", type=int, default=16, help="jobs run at once (16)")
    worker.add_argument("--prefetch", type=int, default=None, help="jobs held at once (2 x concurrency)")
    worker.add_argument("--executor", default="thread", choices=["thread", "process", "inline"])
    worker.add_argument("--name", default=None, help="name shown in stats (default host:pid)")
    worker.add_argument("--grace", type=float, default=30.0, help="seconds to finish running jobs on stop (30)")
    worker.add_argument(
        "--timeout", type=float, default=None, help="seconds an attempt may run, for jobs without a limit (none)"
    )
    worker.add_argument(
        "--hand-back-after",
        type=float,
        default=10.0,
        help="hand buffered jobs back when every slot has been busy this many seconds (10)",
    )

    submit = client_command("submit", _submit, "submit jobs")
    submit.add_argument("queue")
    submit.add_argument("payloads", nargs="*", help="payloads, as JSON where they parse, else strings")
    submit.add_argument("--file", help="JSON lines: one payload a line ('-': standard input)")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--delay", type=float, default=0.0)
    submit.add_argument("--max-attempts", type=int, default=None)
    submit.add_argument("--job-timeout", type=float, default=None, help="seconds each attempt may run (no limit)")
    submit.add_argument("--result-ttl", type=float, default=None, help="seconds the results are kept (the broker's)")
    submit.add_argument("--wait", action="store_true", help="wait for the results and print them")
    submit.add_argument("--timeout", type=float, default=None, help="with --wait: seconds to wait")

    stats = client_command("stats", _stats, "show queues and workers")
    stats.add_argument("--json", action="store_true", help="print JSON")

    top = client_command("top", _top, "a live view of queues and workers, until Ctrl-C")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (1)")
    top.add_argument("--iterations", type=int, default=None, help="stop after this many refreshes")

    dead = client_command("dead", _dead, "list, requeue or purge a queue's dead jobs")
    dead.add_argument("action", choices=["list", "requeue", "purge"])
    dead.add_argument("queue")
    dead.add_argument("job_ids", nargs="*", type=int, help="only these jobs (requeue, purge)")
    dead.add_argument("--limit", type=int, default=100, help="list: at most this many (100)")
    dead.add_argument("--json", action="store_true", help="list: print JSON")

    drain = client_command("drain", _drain, "stop the broker delivering jobs; running ones finish")
    drain.add_argument("--resume", action="store_true", help="deliver again")
    drain.add_argument("--wait", action="store_true", help="wait until no job is in flight")
    drain.add_argument("--timeout", type=float, default=None, help="with --wait: seconds at most")

    job = client_command("job", _job, "show one job, or list a queue's jobs in one state")
    job.add_argument("action", choices=["show", "list"])
    job.add_argument("target", help="show: a job id; list: a queue")
    job.add_argument(
        "--state", default="pending", choices=["pending", "waiting", "delayed", "running", "dead"], help="list"
    )
    job.add_argument("--after", type=int, default=0, help="list: jobs after this id (the last of the previous page)")
    job.add_argument("--limit", type=int, default=100, help="list: at most this many (100, at most 1000)")
    job.add_argument("--json", action="store_true", help="list: print JSON")

    cancel = client_command("cancel", _cancel, "cancel jobs (running ones too: their workers are told)")
    cancel.add_argument("job_ids", nargs="+", type=int)

    queue = client_command(
        "queue", _queue, "list queues, show one, purge its waiting jobs, pause or resume it, set its limits"
    )
    queue.add_argument("action", choices=["list", "show", "purge", "pause", "resume", "set"])
    queue.add_argument("queue", nargs="?", help="the queue (all but list)")
    queue.add_argument("--json", action="store_true", help="list, show: print JSON")
    queue.add_argument("--concurrency", type=int, default=None, help="set: jobs held by workers at once (0: no limit)")
    queue.add_argument("--rate", default=None, help="set: deliveries a second, like 20 or 20/s (0: no limit)")
    schedule = client_command("schedule", _schedule, "add, list or remove periodic jobs kept by the broker")
    schedule.add_argument("action", choices=["add", "list", "remove"])
    schedule.add_argument("name", nargs="?", help="add, remove: the schedule's name")
    schedule.add_argument("queue", nargs="?", help="add: the queue its jobs go to")
    schedule.add_argument("payload", nargs="?", default=None, help="add: the payload, as JSON where it parses")
    schedule.add_argument("--cron", default=None, help='add: 5 fields, like "*/5 * * * *"')
    schedule.add_argument("--every", type=float, default=None, help="add: an interval in seconds, instead of --cron")
    schedule.add_argument("--tz", default="UTC", help="add: the time zone of --cron (UTC)")
    schedule.add_argument(
        "--no-catch-up", action="store_true", help="add: skip a tick missed while the broker was down"
    )
    schedule.add_argument("--json", action="store_true", help="list: print JSON")


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_rate(value: str) -> float:
    """--rate: deliveries a second, like 20 or "20/s" (the broker checks the range)."""
    text = value.strip().removesuffix("/s")
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--rate: {value!r} is not a rate (deliveries a second, like 20 or 20/s)") from None


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"secret_file": args.secret_file, "credential": args.credential, "tls": args.tls_ca}


def _load_handler(spec: str) -> Any:
    """A handler (module:function), a task (module:task) or every task of a module (module)."""
    module_name, sep, function_name = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` does
    if not sep and module_name:
        from jobbroker.client.tasks import tasks_of_module

        try:
            return tasks_of_module(module_name)
        except UsageError as exc:
            raise ConfigError(f"{exc} (give module:function for a plain handler)") from exc
    if not sep or not module_name or not function_name:
        raise ConfigError(f"handler {spec!r} is not module:function (or a module of @task functions)")
    try:
        module = importlib.import_module(module_name)
        handler = getattr(module, function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load handler {spec!r}: {exc}") from exc
    if not callable(handler):
        raise ConfigError(f"handler {spec!r} is not callable")
    return handler


def _worker(args: argparse.Namespace) -> int:
    import socket

    from jobbroker.client.tasks import Task
    from jobbroker.client.worker import Worker

    loaded = _load_handler(args.handler)
    tasks = loaded if isinstance(loaded, list) else [loaded] if isinstance(loaded, Task) else None
    if tasks is None and not args.queue:
        raise ConfigError("a worker on a plain handler needs --queue (tasks know their queues)")
    worker = Worker(
        args.connect,
        queues=args.queue,
        handler=None if tasks is not None else loaded,
        tasks=tasks,
        **_client_options(args),
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        executor=args.executor,
        name=args.name or f"{socket.gethostname()}:{os.getpid()}",
        grace=args.grace,
        handle_signals=True,
        timeout=args.timeout,
        hand_back_after=args.hand_back_after,
        wait_for_broker=args.wait_for_broker,
    )
    log.info("worker on %s taking from %s", args.connect, ", ".join(worker.queues))
    _run(worker.run())
    log.info("worker stopped: %d completed, %d failed", worker.completed, worker.failed)
    _exit_past_abandoned_threads()
    return 0


def _exit_past_abandoned_threads() -> None:
    """Handler threads abandoned at their time limit run on, and Python would wait for them
    at exit: a stopped worker exits without them (after a moment for those about to end)."""
    import threading

    deadline = time.monotonic() + 1.0
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith("jobbroker-worker"):
            thread.join(max(0.0, deadline - time.monotonic()))
    running = [t for t in threading.enumerate() if t.name.startswith("jobbroker-worker") and t.is_alive()]
    if running:
        log.warning(
            "%d handler threads still running (abandoned at their time limit); exiting without them", len(running)
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _parse_payload(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


_SUBMIT_BATCH = 1000


def _submit(args: argparse.Namespace) -> int:
    payloads = [_parse_payload(p) for p in args.payloads]
    if args.file:
        payloads += _read_json_lines(args.file)
    if not payloads:
        raise ConfigError("nothing to submit: give payloads or --file")
    from jobbroker.client.progress import show_progress

    long_submit = len(payloads) > _SUBMIT_BATCH

    async def go(client: Any) -> int:
        ids: list[int] = []
        for start in range(0, len(payloads), _SUBMIT_BATCH):
            ids += await client.submit_many(
                args.queue,
                payloads[start : start + _SUBMIT_BATCH],
                priority=args.priority,
                delay=args.delay,
                max_attempts=args.max_attempts,
                timeout=args.job_timeout,
                result_ttl=args.result_ttl,
            )
            if long_submit:
                show_progress("submitted", len(ids), len(payloads))
        await _warn_if_unserved(client, args.queue)
        if not args.wait:
            print("\n".join(map(str, ids)))
            return EXIT_OK
        outcomes = await asyncio.gather(*(client.result(i, timeout=args.timeout) for i in ids), return_exceptions=True)
        status = EXIT_OK
        for job_id, payload, outcome in zip(ids, payloads, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                code, reason = exit_status(outcome)
                if code is None:
                    raise outcome
                status = max(status, code)
                shown = f"error: {reason}"
            else:
                shown = json.dumps(outcome, default=repr)
            print(f"{job_id}\t{json.dumps(payload)}\t{shown}")
        return status

    return int(_with_client(args, go))


async def _warn_if_unserved(client: Any, queue: str) -> None:
    """Say so when no worker takes from the queue, and which served queue looks meant (a
    typo creates a queue of its own). An admin can tell; others cannot."""
    try:
        workers = (await client.stats())["workers"]
    except BrokerError:
        return
    served = {name for worker in workers for name in worker["queues"]}
    if queue not in served:
        print(f"jobbroker: no worker serves queue {queue!r} yet{_did_you_mean(queue, served)}", file=sys.stderr)


def _read_json_lines(path: str) -> list[Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    payloads = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                payloads.append(json.loads(line))
            except ValueError as exc:
                raise ConfigError(f"{path}, line {number}: not JSON ({exc})") from None
    return payloads


def _stats(args: argparse.Namespace) -> int:
    info = _with_client(args, lambda c: c.stats())
    if args.json:
        print(json.dumps(info, indent=2, default=repr))
    else:
        print(format_stats(info))
    return 0


def _with_client(args: argparse.Namespace, call: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    from jobbroker.client.client import Client

    async def go() -> Any:
        options = _client_options(args)
        async with Client(args.connect, name="cli", wait_for_broker=args.wait_for_broker, **options) as client:
            return await call(client)

    return _run(go())


def _dead(args: argparse.Namespace) -> int:
    ids = args.job_ids or None
    if args.action == "list":
        jobs = _with_client(args, lambda c: c.dead_letters(args.queue, args.limit))
        if args.json:
            print(json.dumps(jobs, indent=2, default=repr))
        elif not jobs:
            print(f"(no dead jobs in {args.queue})")
        else:
            rows = [
                [j["id"], j["attempts"], (j["error"] or {}).get("type", ""), (j["error"] or {}).get("message", "")]
                for j in jobs
            ]
            print("\n".join(table(["job", "attempts", "error", "message"], rows)))
    elif args.action == "requeue":
        print(f"requeued {_with_client(args, lambda c: c.requeue_dead(args.queue, ids))}")
    else:
        print(f"purged {_with_client(args, lambda c: c.purge_dead(args.queue, ids))}")
    return 0


def _top(args: argparse.Namespace) -> int:
    interactive = sys.stdout.isatty()

    async def go(client: Any) -> None:
        shown = 0
        while args.iterations is None or shown < args.iterations:
            info = await client.stats()
            screen = format_stats(info)
            if interactive:
                print("\x1b[H\x1b[2J", end="")  # home, clear: redraw in place
            stamp = time.strftime("%H:%M:%S")
            print(f"jobbroker at {args.connect}, {stamp}{'  (draining)' if info.get('draining') else ''}")
            print(screen, flush=True)
            shown += 1
            if args.iterations is None or shown < args.iterations:
                await asyncio.sleep(args.interval)

    with contextlib.suppress(KeyboardInterrupt):
        _with_client(args, go)
    return 0


def _drain(args: argparse.Namespace) -> int:
    async def go(client: Any) -> int:
        in_flight = int(await client.drain(on=not args.resume))
        if args.wait and not args.resume:
            try:
                async with asyncio.timeout(args.timeout):
                    while in_flight:
                        await asyncio.sleep(0.2)
                        in_flight = sum(q["in_flight"] for q in (await client.stats())["queues"].values())
            except TimeoutError:
                raise TimeoutError(
                    f"deliveries stopped, but {in_flight} jobs were still in flight after {args.timeout:g} s"
                ) from None
        return in_flight

    in_flight = _with_client(args, go)
    print(f"deliveries {'resumed' if args.resume else 'stopped'}; {in_flight} jobs in flight")
    return 0


def _job(args: argparse.Namespace) -> int:
    if args.action == "list":
        jobs = _with_client(args, lambda c: c.jobs(args.target, args.state, after=args.after, limit=args.limit))
        if args.json:
            print(json.dumps(jobs, indent=2))
        elif not jobs:
            print(f"(no {args.state} jobs in {args.target}{f' after {args.after}' if args.after else ''})")
        else:
            rows = [
                [j["id"], j["priority"], f"{j['attempts']}/{j['max_attempts']}", error_text(j["error"])] for j in jobs
            ]
            print("\n".join(table(["job", "priority", "attempts", "last error"], rows)))
            if len(jobs) == args.limit:
                print(f"(more: --after {jobs[-1]['id']})")
        return EXIT_OK
    try:
        job_id = int(args.target)
    except ValueError:
        raise ConfigError(f"job show takes a job id, not {args.target!r}") from None
    info = _with_client(args, lambda c: c.job(job_id))
    width = max(map(len, info))
    for name, value in info.items():
        if name == "error" and isinstance(value, dict):
            print(f"{name:{width}}  {value.get('type')}: {value.get('message')}")
            for line in str(value.get("traceback") or "").rstrip().splitlines():
                print(f"{'':{width}}    {line}")
        elif name == "payload" and value is None and info.get("state") == "done":
            print(f"{name:{width}}  (not kept once the job is done)")
        elif name == "worker" and value is not None:
            print(f"{name:{width}}  {info.get('worker_name') or 'worker'}, session {value}")
        elif name != "worker_name":
            print(f"{name:{width}}  {json.dumps(value, default=repr)}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    refused = _with_client(args, lambda c: c.cancel_many(args.job_ids))
    reasons = {"not_found": "no such job (or its result expired)", "invalid_state": "it has ended already"}
    for job_id in args.job_ids:
        if job_id in refused:
            reason = reasons.get(refused[job_id], refused[job_id])
            print(f"jobbroker: job {job_id} not cancelled: {reason}", file=sys.stderr)
        else:
            print(f"job {job_id}: cancelled")
    return EXIT_REFUSED if refused else EXIT_OK


def _queue(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.queue:
        raise ConfigError(f"queue {args.action} needs a queue name")
    if args.action == "purge":
        purged = _with_client(args, lambda c: c.purge_queue(args.queue))
        print(f"cancelled {purged} waiting jobs of {args.queue}")
        return EXIT_OK
    if args.action in ("pause", "resume", "set"):
        if args.action == "set" and args.concurrency is None and args.rate is None:
            raise ConfigError("queue set takes --concurrency N and/or --rate R")
        rate = None if args.rate is None else _parse_rate(args.rate)
        settings = _with_client(
            args,
            lambda c: (
                c.pause(args.queue)
                if args.action == "pause"
                else c.resume(args.queue)
                if args.action == "resume"
                else c.set_queue(args.queue, concurrency=args.concurrency, rate=rate)
            ),
        )
        print(f"queue {args.queue}: {controls_text(settings)}")
        return EXIT_OK
    queues = _with_client(args, lambda c: c.stats())["queues"]
    if args.action == "list":
        shown: Any = sorted(queues)
        print(json.dumps(shown) if args.json else "\n".join(shown) or "(no queues)")
        return EXIT_OK
    if args.queue not in queues:
        known = ", ".join(sorted(queues)) or "none"
        raise ConfigError(f"no queue named {args.queue!r} (queues: {known})")
    if args.json:
        print(json.dumps(queues[args.queue], indent=2))
    else:
        for name, value in queues[args.queue].items():
            print(f"{name:22} {value}")
    return EXIT_OK


def _schedule(args: argparse.Namespace) -> int:
    if args.action == "list":
        schedules = _with_client(args, lambda c: c.schedules())
        if args.json:
            print(json.dumps(schedules, indent=2))
        elif not schedules:
            print("(no schedules)")
        else:
            rows = [
                [s["name"], s["queue"], s["cron"] or f"every {s['every']:g} s", s["tz"], when(s["next_tick"])]
                for s in schedules
            ]
            print("\n".join(table(["schedule", "queue", "when", "tz", "next tick"], rows)))
        return EXIT_OK
    if not args.name:
        raise ConfigError(f"schedule {args.action} needs a name")
    if args.action == "remove":
        removed = _with_client(args, lambda c: c.unschedule(args.name))
        print(f"schedule {args.name}: {'removed' if removed else 'there was none'}")
        return EXIT_OK if removed else EXIT_REFUSED
    if not args.queue or (args.cron is None) == (args.every is None):
        raise ConfigError("schedule add takes NAME QUEUE [PAYLOAD] and one of --cron or --every")
    payload = None if args.payload is None else _parse_payload(args.payload)
    record = _with_client(
        args,
        lambda c: c.schedule(
            args.name, args.queue, payload, cron=args.cron, every=args.every, tz=args.tz, catch_up=not args.no_catch_up
        ),
    )
    print(f"schedule {args.name}: next tick {when(record['next_tick'])}")
    return EXIT_OK
