"""The messages (docs/protocol.md, "Messages"): one frozen dataclass per op, encoded as a
msgpack map {"op": ..., field: value, ...}.

decode() is the one place where msgpack errors and wrongly typed fields become
MalformedMessage; every field of every message is checked against its annotation here, so the
layers above never see a wrongly typed value from the network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
from jobbroker.broker.errors import MalformedMessage
from jobbroker.broker.protocol.rows import (
    CompleteRow,
    DeliveryRow,
    FailRow,
    ProgressedRow,
    ProgressRow,
    ReleaseRow,
    ResultRow,
    RevokedRow,
    StartedRow,
    TouchRow,
)
from jobbroker.broker.protocol.schema import Invalid, Schema, compile_schema

__all__ = [
    "MESSAGE_TYPES",
    "Authenticate",
    "Cancel",
    "Challenge",
    "Complete",
    "DeadList",
    "DeadPurge",
    "DeadRequeue",
    "Deliver",
    "Drain",
    "ErrorReply",
    "Fail",
    "Heartbeat",
    "Hello",
    "JobInfo",
    "JobList",
    "Message",
    "Progress",
    "Progressed",
    "QueuePurge",
    "QueueSet",
    "Release",
    "Reply",
    "Request",
    "Reserve",
    "Results",
    "Revoked",
    "ScheduleList",
    "ScheduleRemove",
    "ScheduleSet",
    "Started",
    "Stats",
    "Submit",
    "Touch",
    "Watch",
    "Welcome",
    "decode",
    "encode",
    "encode_items",
    "request_id",
]

# The rows of the batch messages are defined once, in rows.py; payloads and results are
# opaque bytes (protocol version 2): the broker checks their length, never their content.


class Message:
    """Base of all messages. `op` names the message on the wire."""

    op: ClassVar[str]
    __slots__ = ()


class Request(Message):
    """A client request; the broker answers with a Reply or ErrorReply carrying the same id."""

    __slots__ = ()
    id: int


# --- handshake (before the session keys exist; frames carry no MAC) ---------------------


@dataclass(frozen=True, slots=True)
class Hello(Message):
    op: ClassVar[str] = "hello"
    version: int
    nonce: bytes
    client: str = ""
    credential: str = "default"


@dataclass(frozen=True, slots=True)
class Challenge(Message):
    op: ClassVar[str] = "challenge"
    version: int
    nonce: bytes
    proofs: list[bytes]  # one per secret of the credential (several while rotating)


@dataclass(frozen=True, slots=True)
class Authenticate(Message):
    op: ClassVar[str] = "authenticate"
    proof: bytes


@dataclass(frozen=True, slots=True)
class Welcome(Message):
    op: ClassVar[str] = "welcome"
    session: int
    heartbeat: float
    max_frame_size: int
    role: str = "admin"
    # Set by a standby only: the leading broker's advertised "HOST:PORT" (docs/protocol.md,
    # "Standbys"), so that a client moves there before sending a request.
    leader: str | None = None


# --- both directions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    op: ClassVar[str] = "heartbeat"


# --- notices: worker to broker, no id and no reply ----------------------------------------


@dataclass(frozen=True, slots=True)
class Started(Message):
    """The worker began running these delivered jobs (docs/protocol.md, "Attempts"): their
    attempt counts from here. Batched per loop turn; a job completed or failed in the same
    turn needs none (the answer implies the start)."""

    op: ClassVar[str] = "started"
    items: list[StartedRow]


# --- requests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submit(Request):
    op: ClassVar[str] = "submit"
    id: int
    queue: str
    payloads: list[bytes]  # opaque (docs/protocol.md, "Payloads and results")
    priority: int = 0
    delay: float = 0.0
    max_attempts: int | None = None
    lease: float | None = None
    backoff: float | None = None
    keys: list[str | None] | None = None
    watch: bool = False
    timeout: float | None = None
    result_ttl: float | None = None
    max_backoff: float | None = None
    after: list[int] | None = None
    after_policy: str = "done"


@dataclass(frozen=True, slots=True)
class Reserve(Request):
    op: ClassVar[str] = "reserve"
    id: int
    queues: list[str]
    prefetch: int


@dataclass(frozen=True, slots=True)
class Complete(Request):
    op: ClassVar[str] = "complete"
    id: int
    items: list[CompleteRow]


@dataclass(frozen=True, slots=True)
class Fail(Request):
    op: ClassVar[str] = "fail"
    id: int
    items: list[FailRow]


@dataclass(frozen=True, slots=True)
class Touch(Request):
    op: ClassVar[str] = "touch"
    id: int
    items: list[TouchRow]


@dataclass(frozen=True, slots=True)
class Progress(Request):
    op: ClassVar[str] = "progress"
    id: int
    items: list[ProgressRow]


@dataclass(frozen=True, slots=True)
class Release(Request):
    op: ClassVar[str] = "release"
    id: int
    items: list[ReleaseRow]


@dataclass(frozen=True, slots=True)
class Watch(Request):
    op: ClassVar[str] = "watch"
    id: int
    job_ids: list[int]


@dataclass(frozen=True, slots=True)
class Cancel(Request):
    op: ClassVar[str] = "cancel"
    id: int
    job_ids: list[int]


@dataclass(frozen=True, slots=True)
class Stats(Request):
    op: ClassVar[str] = "stats"
    id: int


@dataclass(frozen=True, slots=True)
class JobInfo(Request):
    op: ClassVar[str] = "job"
    id: int
    job_id: int


@dataclass(frozen=True, slots=True)
class JobList(Request):
    """A page of a queue's jobs in one state, by id (docs/protocol.md, "job_list")."""

    op: ClassVar[str] = "job_list"
    id: int
    queue: str
    state: str
    after: int = 0
    limit: int = 100


@dataclass(frozen=True, slots=True)
class QueueSet(Request):
    """Set a queue's controls (docs/protocol.md, "queue_set"); nil leaves a setting as it is."""

    op: ClassVar[str] = "queue_set"
    id: int
    queue: str
    paused: bool | None = None
    concurrency: int | None = None
    rate: float | None = None


@dataclass(frozen=True, slots=True)
class ScheduleSet(Request):
    """Add or replace a periodic job (docs/protocol.md, "schedule_set")."""

    op: ClassVar[str] = "schedule_set"
    id: int
    name: str
    queue: str
    payload: bytes | None = None  # opaque, as a submit's
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    catch_up: bool = True
    options: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ScheduleRemove(Request):
    op: ClassVar[str] = "schedule_remove"
    id: int
    name: str


@dataclass(frozen=True, slots=True)
class ScheduleList(Request):
    op: ClassVar[str] = "schedule_list"
    id: int


@dataclass(frozen=True, slots=True)
class QueuePurge(Request):
    """Cancel every pending and delayed job of a queue."""

    op: ClassVar[str] = "queue_purge"
    id: int
    queue: str


@dataclass(frozen=True, slots=True)
class DeadList(Request):
    op: ClassVar[str] = "dead_list"
    id: int
    queue: str
    limit: int = 100


@dataclass(frozen=True, slots=True)
class DeadRequeue(Request):
    op: ClassVar[str] = "dead_requeue"
    id: int
    queue: str
    job_ids: list[int] | None = None


@dataclass(frozen=True, slots=True)
class DeadPurge(Request):
    op: ClassVar[str] = "dead_purge"
    id: int
    queue: str
    job_ids: list[int] | None = None


@dataclass(frozen=True, slots=True)
class Drain(Request):
    op: ClassVar[str] = "drain"
    id: int
    on: bool = True


# --- broker to client -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """Success. `data` holds the op's reply fields (docs/protocol.md lists them per op)."""

    op: ClassVar[str] = "ok"
    id: int
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """Failure of request `id`, or of the connection itself when id is None."""

    op: ClassVar[str] = "error"
    id: int | None
    code: str
    message: str
    leader: str | None = None  # with code "not_leader": the leading broker's "HOST:PORT", if known


@dataclass(frozen=True, slots=True)
class Deliver(Message):
    op: ClassVar[str] = "deliver"
    jobs: list[DeliveryRow]


@dataclass(frozen=True, slots=True)
class Revoked(Message):
    """Jobs this worker held that the broker took back (cancelled, over their time limit):
    stop running them; an answer for them would be refused."""

    op: ClassVar[str] = "revoked"
    items: list[RevokedRow]


@dataclass(frozen=True, slots=True)
class Results(Message):
    op: ClassVar[str] = "results"
    items: list[ResultRow]


@dataclass(frozen=True, slots=True)
class Progressed(Message):
    """Progress reports of watched jobs."""

    op: ClassVar[str] = "progressed"
    items: list[ProgressedRow]


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.op: cls
    for cls in (
        Hello,
        Challenge,
        Authenticate,
        Welcome,
        Heartbeat,
        Started,
        Submit,
        Reserve,
        Complete,
        Fail,
        Touch,
        Release,
        Watch,
        Cancel,
        Stats,
        JobInfo,
        JobList,
        QueueSet,
        QueuePurge,
        ScheduleSet,
        ScheduleRemove,
        ScheduleList,
        DeadList,
        DeadRequeue,
        DeadPurge,
        Drain,
        Reply,
        ErrorReply,
        Deliver,
        Results,
        Revoked,
        Progress,
        Progressed,
    )
}

# --- validation, compiled once from the annotations (schema.py) ----------------------------

_SCHEMAS: dict[str, tuple[type[Message], Schema]] = {
    cls.op: (cls, compile_schema(cls)) for cls in MESSAGE_TYPES.values()
}
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    for cls in MESSAGE_TYPES.values()
}


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack extension type {code} is not part of the protocol")


def encode(message: Message) -> bytes:
    """The msgpack body of `message`."""
    wire: dict[str, Any] = {"op": message.op}
    for name in _FIELD_NAMES[type(message)]:
        wire[name] = getattr(message, name)
    return msgpack.packb(wire, use_bin_type=True)


# The one list field of each push, which encode_items() fills item by item.
_ITEMS_FIELD: dict[type[Message], str] = {Deliver: "jobs", Results: "items", Progressed: "items", Revoked: "items"}

PushType = type[Deliver] | type[Results] | type[Progressed] | type[Revoked]


def encode_items(message_type: PushType, items: list[Any], max_size: int) -> tuple[bytes, int]:
    """The body of a push carrying as many of `items`, from the first, as fit in `max_size`
    bytes, and how many that is (0: the first item alone is over). Each item is encoded once,
    so a large batch is cut to size without building it whole first.

    The body is the one encode() would give for message_type(items[:count])."""
    packer = msgpack.Packer(use_bin_type=True)
    field_name = _ITEMS_FIELD[message_type]
    head = packer.pack_map_header(2) + packer.pack("op") + packer.pack(message_type.op) + packer.pack(field_name)
    size = len(head) + 5  # the array header takes at most 5 bytes
    parts: list[bytes] = []
    for item in items:
        part = packer.pack(item)  # a payload or result goes in as msgpack bin: copied, not parsed
        if size + len(part) > max_size:
            break
        size += len(part)
        parts.append(part)
    if not parts:
        return b"", 0
    return b"".join((head, packer.pack_array_header(len(parts)), *parts)), len(parts)


# The bounds of a failure as stored and reported (docs/protocol.md, "fail"): both sides cut
# with bounded(), so that a cut is made once and says how much it took.
MAX_ERROR_TYPE = 200
MAX_ERROR_MESSAGE = 2000
MAX_TRACEBACK = 8192


def bounded(text: str, limit: int, *, keep_end: bool = False) -> str:
    """`text` in at most `limit` characters, marker included, and valid UTF-8 (a lone
    surrogate, which msgpack cannot encode, becomes an escape). A cut says how many
    characters it took; `keep_end` keeps the end (a traceback's frames nearest the raise)."""
    try:
        text.encode("utf-8")  # in C: a per-character scan in Python cost 50 ms on a 1 MB message
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    widest = len(f"[... {len(text)} characters cut ...]")  # the count has at most these digits
    kept = max(0, limit - widest - 1)
    marker = f"[... {len(text) - kept} characters cut ...]"
    return marker + "\n" + text[len(text) - kept :] if keep_end else text[:kept] + " " + marker


def request_id(body: bytes) -> int | None:
    """The `id` of a frame body, if it is a msgpack map with an integer id; else None. For
    errors about messages that decode() took but that may not be sent here (their type has
    no id field)."""
    try:
        wire = msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_reject_ext)
    except Exception:
        return None
    return _request_id(wire) if type(wire) is dict else None


def decode(body: bytes) -> Message:
    """Parse and check one frame body.

    Raises:
        MalformedMessage: not msgpack, not a map, an unknown op, or a field missing or of the
            wrong type. The message says which.
    """
    try:
        wire = msgpack.unpackb(body, raw=False, strict_map_key=False, ext_hook=_reject_ext)
    except MalformedMessage:
        raise
    except Exception as exc:  # msgpack raises many types for bad input; all mean the same here
        raise MalformedMessage(f"frame body is not valid msgpack: {exc}") from exc
    if type(wire) is not dict:
        raise MalformedMessage("frame body is not a msgpack map")
    op = wire.get("op")
    entry = _SCHEMAS.get(op) if type(op) is str else None
    if entry is None:
        raise MalformedMessage(f"unknown op {op!r}", _request_id(wire))
    cls, schema = entry
    values: dict[str, Any] = {}
    for name, check, required in schema:
        if name in wire:
            try:
                values[name] = check(wire[name])
            except Invalid as exc:
                raise MalformedMessage(f"{op}.{name} must be {exc}", _request_id(wire)) from None
        elif required:
            raise MalformedMessage(f"{op} lacks field {name!r}", _request_id(wire))
    return cls(**values)


def _request_id(wire: dict[Any, Any]) -> int | None:
    request_id = wire.get("id")
    return request_id if type(request_id) is int else None
