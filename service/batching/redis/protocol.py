"""What the API and the workers say to each other through Redis: key names, the fields of
a queue entry, and the binary payloads of requests and results.

Arrays travel as msgpack maps holding the raw float32 bytes with their shape and dtype,
so a 3x64x64 image costs 48 KiB on the wire and no float is ever formatted as text.
Both sides import only this module to agree on the format; nothing here touches Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np

from service.batching.base import (
    BatchingError,
    DeadlineExceeded,
    InferenceFailed,
    ModelRef,
    Scored,
)

PREFIX = "gansentry"
GROUP = "workers"
DLQ_STREAM = f"{PREFIX}:dlq"
WORKER_KEY_PREFIX = f"{PREFIX}:worker:"
# Pub/sub, not a stream: a notice only says "rescan the model repository now". A worker
# that misses one (down, or reconnecting) rescans anyway when it starts or reconnects and
# periodically (service/batching/redis/worker.py), so there is nothing to replay.
RELOAD_CHANNEL = f"{PREFIX}:reload"
DTYPE = "float32"


class ProtocolError(ValueError):
    """A queue entry or result that cannot be decoded; the message says which part."""


def stream_key(model: ModelRef) -> str:
    """One stream (and one consumer group) per model version, so a worker can serve a
    subset of the models and the queue depth is visible per model."""
    return f"{PREFIX}:q:{model.name}:{model.version}"


def model_of_stream(key: str | bytes) -> ModelRef:
    text = key.decode() if isinstance(key, bytes) else key
    prefix = f"{PREFIX}:q:"
    if not text.startswith(prefix):
        raise ProtocolError(f"{text!r} is not a gansentry queue stream")
    name, _, version = text[len(prefix) :].rpartition(":")
    if not name or not version.isdigit():
        raise ProtocolError(f"{text!r} does not name a model version")
    return ModelRef(name, int(version))


def reply_key(api_id: str) -> str:
    """One reply list per API process, read by one task, instead of one BLPOP connection
    per in-flight request."""
    return f"{PREFIX}:reply:{api_id}"


def done_key(request_id: str) -> str:
    """Set once when a request's answer is delivered: a redelivered entry finds it and is
    acknowledged without being computed or answered again."""
    return f"{PREFIX}:done:{request_id}"


def worker_key(name: str) -> str:
    return f"{WORKER_KEY_PREFIX}{name}"


def encode_array(a: np.ndarray) -> dict[str, object]:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return {"shape": list(a.shape), "dtype": DTYPE, "data": a.tobytes()}


def decode_array(obj: object, what: str) -> np.ndarray:
    if not isinstance(obj, Mapping):
        raise ProtocolError(f"{what}: expected a map with shape, dtype and data")
    try:
        shape = tuple(int(d) for d in obj["shape"])
        dtype = obj["dtype"]
        data = obj["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"{what}: missing or malformed shape/dtype/data ({e})") from e
    if dtype != DTYPE:
        raise ProtocolError(f"{what}: dtype {dtype!r}, expected {DTYPE!r}")
    if not isinstance(data, bytes):
        raise ProtocolError(f"{what}: data must be raw bytes")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"{what}: negative dimension in shape {list(shape)}")
    expected = int(np.prod(shape, dtype=np.int64)) * 4
    if len(data) != expected:
        raise ProtocolError(
            f"{what}: {len(data)} bytes for shape {list(shape)}, expected {expected}"
        )
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


@dataclass(frozen=True)
class Request:
    """One queue entry: one HTTP request with all of its n inputs."""

    request_id: str
    deadline: float
    enqueued_at: float
    reply_to: str
    x: np.ndarray
    want_reconstruction: bool = True
    want_anomaly_map: bool = False

    def fields(self) -> dict[str, bytes | str]:
        return {
            "rid": self.request_id,
            "deadline": repr(self.deadline),
            "enq": repr(self.enqueued_at),
            "reply": self.reply_to,
            "n": str(self.n),
            "recon": "1" if self.want_reconstruction else "0",
            "amap": "1" if self.want_anomaly_map else "0",
            "payload": msgpack.packb({"x": encode_array(self.x)}),
        }

    @property
    def n(self) -> int:
        return int(self.x.shape[0]) if self.x.ndim else 0


@dataclass(frozen=True)
class Envelope:
    """The part of an entry needed to answer it even when its payload is unreadable."""

    request_id: str
    reply_to: str
    deadline: float
    enqueued_at: float


def _text(fields: Mapping[bytes, bytes], name: str) -> str:
    value = fields.get(name.encode())
    if value is None:
        raise ProtocolError(f"entry has no {name!r} field")
    return value.decode()


def decode_envelope(fields: Mapping[bytes, bytes]) -> Envelope:
    try:
        return Envelope(
            request_id=_text(fields, "rid"),
            reply_to=_text(fields, "reply"),
            deadline=float(_text(fields, "deadline")),
            enqueued_at=float(_text(fields, "enq")),
        )
    except (UnicodeDecodeError, ValueError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"malformed entry header: {e}") from e


def decode_request(fields: Mapping[bytes, bytes], sample_shape: tuple[int, ...]) -> Request:
    """Parse an entry and check its array against the model's sample shape, so a bad
    payload is refused with a message instead of reaching ONNX Runtime."""
    env = decode_envelope(fields)
    raw = fields.get(b"payload")
    if raw is None:
        raise ProtocolError("entry has no 'payload' field")
    try:
        body = msgpack.unpackb(raw)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"payload is not msgpack: {e}") from e
    if not isinstance(body, Mapping) or "x" not in body:
        raise ProtocolError("payload has no 'x' array")
    x = decode_array(body["x"], "payload x")
    if x.ndim != 1 + len(sample_shape) or tuple(x.shape[1:]) != tuple(sample_shape):
        expected = ", ".join(str(d) for d in ("n", *sample_shape))
        raise ProtocolError(f"payload x has shape {list(x.shape)}, expected [{expected}]")
    if x.shape[0] < 1:
        raise ProtocolError("payload x holds no inputs")
    want = fields.get(b"recon", b"1") != b"0"  # entries from older APIs have no flag
    want_map = fields.get(b"amap", b"0") == b"1"
    return Request(env.request_id, env.deadline, env.enqueued_at, env.reply_to, x, want, want_map)


# Error kinds a worker can answer with, and the exception the API raises for each.
DEADLINE = "deadline"
INFERENCE = "inference"
BAD_INPUT = "bad_input"
POISON = "poison"
_ERRORS: dict[str, type[BatchingError]] = {
    DEADLINE: DeadlineExceeded,
    INFERENCE: InferenceFailed,
    BAD_INPUT: InferenceFailed,
    POISON: InferenceFailed,
}


def encode_result(
    request_id: str,
    scores: np.ndarray,
    recon: np.ndarray | None,
    anomaly_map: np.ndarray | None = None,
) -> bytes:
    body: dict[str, object] = {"rid": request_id, "ok": True, "scores": encode_array(scores)}
    if recon is not None:
        body["recon"] = encode_array(recon)
    if anomaly_map is not None:
        body["amap"] = encode_array(anomaly_map)
    return msgpack.packb(body)


def encode_error(request_id: str, kind: str, message: str) -> bytes:
    return msgpack.packb({"rid": request_id, "ok": False, "kind": kind, "message": message})


@dataclass
class Result:
    request_id: str
    scored: Scored | None = None
    error: BatchingError | None = field(default=None)


def decode_result(raw: bytes) -> Result:
    try:
        body = msgpack.unpackb(raw)
        rid = body["rid"]
    except Exception as e:
        raise ProtocolError(f"unreadable result: {e}") from e
    if body.get("ok"):
        scores = decode_array(body.get("scores"), "result scores")
        raw_recon = body.get("recon")
        recon = None if raw_recon is None else decode_array(raw_recon, "result reconstruction")
        raw_map = body.get("amap")
        amap = None if raw_map is None else decode_array(raw_map, "result anomaly map")
        return Result(rid, scored=Scored(scores, recon, amap))
    kind = body.get("kind", INFERENCE)
    error_type = _ERRORS.get(kind, InferenceFailed)
    return Result(rid, error=error_type(str(body.get("message", kind))))


@dataclass(frozen=True)
class Heartbeat:
    """The value of a worker's heartbeat key: what it serves and on which provider."""

    name: str
    pid: int
    host: str
    models: dict[str, str]  # "name:version" -> provider
    started_at: float
    beat_at: float = field(default_factory=time.time)

    def encode(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def decode(cls, raw: bytes | str) -> Heartbeat:
        try:
            d = json.loads(raw)
            return cls(
                name=str(d["name"]),
                pid=int(d["pid"]),
                host=str(d["host"]),
                models={str(k): str(v) for k, v in d["models"].items()},
                started_at=float(d["started_at"]),
                beat_at=float(d["beat_at"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProtocolError(f"unreadable heartbeat: {e}") from e


# Backpressure and enqueue in one atomic step: no race between API replicas checking the
# bound and adding. Workers delete entries once answered, so XLEN counts exactly the
# entries waiting or being computed (pending); MAXLEN ~ is a second, never-reached guard.
ENQUEUE_LUA = """
local bound = tonumber(ARGV[1])
if redis.call('XLEN', KEYS[1]) >= bound then
  return false
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', bound, '*', unpack(ARGV, 2))
"""

# Deliver a batch's answers and acknowledge its entries atomically. KEYS: the stream, then
# per entry its done key and reply list; ARGV: group, ttl, then per entry its id and
# answer ('' = acknowledge only). The done key (SET NX) makes the answer exactly-once
# even when two workers computed the same entry; the entry is acked and deleted in the
# same step, so an acked entry always has its answer delivered. Returns one flag per entry,
# 1 where this call delivered the answer: a worker counts what it answered (an expired
# entry, say) from these flags, not from what it meant to send, because another worker
# may have answered the same request in the meantime.
DELIVER_LUA = """
local ttl = tonumber(ARGV[2])
local delivered = {}
for i = 1, (#KEYS - 1) / 2 do
  local id, answer = ARGV[2 * i + 1], ARGV[2 * i + 2]
  delivered[i] = 0
  if answer ~= '' and redis.call('SET', KEYS[2 * i], '1', 'NX', 'EX', ttl) then
    redis.call('RPUSH', KEYS[2 * i + 1], answer)
    redis.call('EXPIRE', KEYS[2 * i + 1], ttl)
    delivered[i] = 1
  end
  redis.call('XACK', KEYS[1], ARGV[1], id)
  redis.call('XDEL', KEYS[1], id)
end
return delivered
"""
