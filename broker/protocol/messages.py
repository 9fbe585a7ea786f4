"""The messages (docs/protocol.md, "Messages"): one frozen dataclass per op, encoded as a
msgpack map {"op": ..., field: value, ...}.

decode() is the one place where msgpack errors and wrongly typed fields become
MalformedMessage; every field of every message is checked against its annotation here, so the
layers above never see a wrongly typed value from the network.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
from jobbroker.broker.errors import MalformedMessage

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
    "Packed",
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
    "packed",
    "request_id",
    "unpacked",
]

# Per-item layouts of the batch messages; msgpack carries them as arrays. A trailing column
# typed `X | None` is optional: a row may stop before it (older peers) or carry nil.
CompleteItem = tuple[int, int, Any]  # job_id, lease token, result
# job_id, lease token, error type, error message, then optional: formatted traceback, final
# (no retry: dead at once), retry delay in seconds (instead of the job's backoff)
FailItem = tuple[int, int, str, str, str | None, bool | None, float | None]
TouchItem = tuple[int, int, float]  # job_id, lease token, new lease in seconds (0: the job's own)
ReleaseItem = tuple[int, int]  # job_id, lease token
StartedItem = tuple[int, int]  # job_id, lease token
RevokedItem = tuple[int, int, str]  # job_id, lease token, why the worker no longer holds it
# job_id, token, queue, payload, attempt, lease, run-time limit in seconds (nil: none), the
# results of the jobs it runs after, in `after` order (nil: it runs after none)
DeliveryItem = tuple[int, int, str, Any, int, float, float | None, Any | None]
ResultItem = tuple[int, str, Any]  # job_id, final state, result or error
ProgressItem = tuple[int, int, float, str]  # job_id, lease token, fraction done (0..1), message
ProgressedItem = tuple[int, float, str]  # job_id, fraction done, message


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
    items: list[StartedItem]


# --- requests ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Submit(Request):
    op: ClassVar[str] = "submit"
    id: int
    queue: str
    payloads: list[Any]
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
    items: list[CompleteItem]


@dataclass(frozen=True, slots=True)
class Fail(Request):
    op: ClassVar[str] = "fail"
    id: int
    items: list[FailItem]


@dataclass(frozen=True, slots=True)
class Touch(Request):
    op: ClassVar[str] = "touch"
    id: int
    items: list[TouchItem]


@dataclass(frozen=True, slots=True)
class Progress(Request):
    op: ClassVar[str] = "progress"
    id: int
    items: list[ProgressItem]


@dataclass(frozen=True, slots=True)
class Release(Request):
    op: ClassVar[str] = "release"
    id: int
    items: list[ReleaseItem]


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
    payload: Any = None
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
    jobs: list[DeliveryItem]


@dataclass(frozen=True, slots=True)
class Revoked(Message):
    """Jobs this worker held that the broker took back (cancelled, over their time limit):
    stop running them; an answer for them would be refused."""

    op: ClassVar[str] = "revoked"
    items: list[RevokedItem]


@dataclass(frozen=True, slots=True)
class Results(Message):
    op: ClassVar[str] = "results"
    items: list[ResultItem]


@dataclass(frozen=True, slots=True)
class Progressed(Message):
    """Progress reports of watched jobs."""

    op: ClassVar[str] = "progressed"
    items: list[ProgressedItem]


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

# --- validation, built once from the annotations ------------------------------------------

Checker = Callable[[Any], Any]  # returns the (possibly converted) value or raises _Invalid


class _Invalid(Exception):
    pass


def _check_int(value: Any) -> int:
    if type(value) is not int:
        raise _Invalid("an integer")
    return value


def _check_float(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _Invalid("a number")


def _simple(kind: type, label: str) -> Checker:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise _Invalid(label)
        return value

    return check


def _any(value: Any) -> Any:
    return value


def _checker(annotation: Any) -> Checker:
    if annotation is Any:
        return _any
    if annotation is int:
        return _check_int
    if annotation is float:
        return _check_float
    if annotation in (str, bytes, bool, dict):
        return _simple(annotation, f"of type {annotation.__name__}")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is types.UnionType or origin is typing.Union:
        inner = _checker(next(a for a in args if a is not type(None)))

        def optional(value: Any) -> Any:
            return None if value is None else inner(value)

        return optional
    if origin is dict:
        return _simple(dict, "a map")
    if origin is list and typing.get_origin(args[0]) is tuple:
        return _rows_checker(typing.get_args(args[0]))
    if origin is list and args[0] in (int, str, bytes):
        return _plain_list_checker(args[0])
    if origin is list:
        item = _checker(args[0])

        def check_list(value: Any) -> list[Any]:
            if type(value) is not list:
                raise _Invalid("an array")
            return value if item is _any else [item(v) for v in value]

        return check_list
    raise TypeError(f"no checker for {annotation!r}")


# The batch checkers below run once per job of a frame: they check in place, allocate nothing,
# and convert only an int found where a float belongs.


def _plain_list_checker(kind: type) -> Checker:
    def check_plain_list(value: Any) -> list[Any]:
        if type(value) is not list:
            raise _Invalid("an array")
        for item in value:
            if type(item) is not kind:
                raise _Invalid(f"an array of {kind.__name__}")
        return value

    return check_plain_list


def _rows_checker(columns: tuple[Any, ...]) -> Checker:
    """list[tuple[...]]: an array of arrays, one item per column, each column int, str, float,
    bool or Any; trailing columns typed `X | None` may be missing or nil."""
    kinds: list[Any] = []
    optional: list[bool] = []
    for column in columns:
        if typing.get_origin(column) in (types.UnionType, typing.Union):
            kinds.append(next(a for a in typing.get_args(column) if a is not type(None)))
            optional.append(True)
        else:
            kinds.append(column)
            optional.append(False)
    size = len(columns)
    minimum = size
    while minimum and optional[minimum - 1]:
        minimum -= 1
    if not all(optional[minimum:]) or any(optional[:minimum]):
        raise TypeError(f"optional columns must come last: {columns!r}")
    typed = [(index, kind, optional[index]) for index, kind in enumerate(kinds) if kind is not Any]
    if any(kind not in (int, str, float, bool) for _, kind, _ in typed):
        raise TypeError(f"no row checker for {columns!r}")
    # Rows may carry columns past those listed (a later version's): they are ignored.
    shape = f"an array of arrays of at least {minimum}"

    def check_rows(value: Any) -> list[Any]:
        if type(value) is not list:
            raise _Invalid(shape)
        for row in value:
            if type(row) is not list or len(row) < minimum:
                raise _Invalid(shape)
            length = len(row)
            for index, kind, may_be_nil in typed:
                if index >= length:
                    break
                item = row[index]
                if type(item) is not kind:
                    if kind is float and type(item) is int:
                        row[index] = float(item)
                    elif not (may_be_nil and item is None):
                        raise _Invalid(f"{shape} with {kind.__name__} at position {index}")
        return value

    return check_rows


_Schema = tuple[tuple[str, Checker, bool], ...]  # name, checker, required
_SCHEMAS: dict[str, tuple[type[Message], _Schema]] = {}
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {}

for _cls in MESSAGE_TYPES.values():
    _hints = typing.get_type_hints(_cls)
    _fields = dataclasses.fields(_cls)  # type: ignore[arg-type]
    _SCHEMAS[_cls.op] = (
        _cls,
        tuple(
            (
                f.name,
                _checker(_hints[f.name]),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in _fields
        ),
    )
    _FIELD_NAMES[_cls] = tuple(f.name for f in _fields)


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack extension type {code} is not part of the protocol")


def encode(message: Message) -> bytes:
    """The msgpack body of `message`."""
    wire: dict[str, Any] = {"op": message.op}
    for name in _FIELD_NAMES[type(message)]:
        wire[name] = getattr(message, name)
    return msgpack.packb(wire, use_bin_type=True)


# The one list field of each push, which encode_items() fills item by item.
class Packed(bytes):
    """A value already packed as msgpack (a job's payload, as the broker holds it): it costs
    its encoded size, and goes out spliced into the frames that carry it, never re-encoded."""

    __slots__ = ()


# One packer for packed(): msgpack.packb() makes a packer per call, which costs more than the
# packing of a small payload. Called on the event loop's thread only.
_PAYLOAD_PACKER = msgpack.Packer(use_bin_type=True)


def packed(value: Any) -> Packed:
    """`value` packed once, to be held and forwarded as it is.

    Raises:
        TypeError, ValueError, OverflowError: msgpack cannot encode it.
    """
    try:
        return Packed(_PAYLOAD_PACKER.pack(value))
    except BaseException:
        _PAYLOAD_PACKER.reset()  # a failed pack may leave a partial value in the packer's buffer
        raise


def unpacked(value: Any) -> Any:
    """The value of a Packed (any other value as it is), for a reply that shows it."""
    return msgpack.unpackb(value, raw=False, strict_map_key=False) if type(value) is Packed else value


def _pack_row(packer: Any, row: Any) -> bytes:
    """One item of a push: a Packed column goes in as its bytes. The common case, a delivery
    (its payload in column 3), takes three packs: the columns before and after the payload
    each packed as an array whose one-byte header (at most 15 columns) is dropped."""
    if type(row) is not list:
        return packer.pack(row)
    if len(row) < 16 and len(row) > 3 and type(row[3]) is Packed:
        return packer.pack_array_header(len(row)) + packer.pack(row[:3])[1:] + row[3] + packer.pack(row[4:])[1:]
    if any(type(column) is Packed for column in row):
        return packer.pack_array_header(len(row)) + b"".join(
            column if type(column) is Packed else packer.pack(column) for column in row
        )
    return packer.pack(row)


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
        part = _pack_row(packer, item)
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
            except _Invalid as exc:
                raise MalformedMessage(f"{op}.{name} must be {exc}", _request_id(wire)) from None
        elif required:
            raise MalformedMessage(f"{op} lacks field {name!r}", _request_id(wire))
    return cls(**values)


def _request_id(wire: dict[Any, Any]) -> int | None:
    request_id = wire.get("id")
    return request_id if type(request_id) is int else None
