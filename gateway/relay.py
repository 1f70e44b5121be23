"""Publishing from a process of its own: the relay.

The gateway answers on one core, and its event loop is its bottleneck. Encoding each
prediction event there and handing it to aiokafka (batching, zstd, the produce protocol,
acknowledgements) cost 15-17 % of the requests it could answer. The relay moves that work
to a child process, ``python -m gateway.relay``, on the machine's other core. The child runs
the one ``EventPublisher``: Kafka, the durable spool and the replay. The gateway only writes
frames to the relay's standard input, a few milliseconds of them per write:

- the first line is the relay's configuration (``RelayConfig``, JSON);
- then frames (``FrameWriter``, ``FrameReader``): a kind and a length, then the body. A
  record frame carries topic, key and value. A prediction frame carries the figures of one
  answered row and its features' JSON; the relay turns it into the ``PredictionEvent``
  record, with the event's id, its time and the fields naming the model (sent once per
  model version, in a model frame).

The relay writes a ``PublisherStatus`` line to its standard output every
``_STATUS_SECONDS``. The gateway reports it as its own (``/health/ready``, metrics).

Closing the relay's standard input is its stop signal: it hands everything it read to Kafka
or the spool, reports a last status and exits. A gateway killed outright closes it too, so
the relay never outlives the gateway. The relay ignores SIGINT and SIGTERM sent to the whole
process group: it stops after the gateway, not before it. If the relay dies anyway, the
gateway logs it, counts it (``gateway_relay_restarts_total``) and starts another. The events
the dead relay held in memory or had still to read are lost, as an in-process publisher's
queue is lost when its gateway dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from driftloop.events.spool import Spool, SpoolRecord
from driftloop.settings import KafkaSettings
from gateway.publishing import (
    Answer,
    EventPublisher,
    ModelKey,
    PredictionRecords,
    PublisherState,
    PublisherStatus,
    datetime_of,
    encode_record,
)
from schemas.events import Event, PredictionSource

log = logging.getLogger(__name__)

# Every frame: its kind and the length of its body.
_FRAME: Final = struct.Struct("!BI")
# A record's body: topic length, key length (-1: no key); then topic, key and value.
_RECORD: Final = struct.Struct("!Hi")
# A model's body: its index; then [name, version, run id] as JSON.
_MODEL: Final = struct.Struct("!H")
# A prediction's body: model index, time (us since the epoch), prediction, latency (ms),
# request id length; then the request id and the features as JSON.
_PREDICTION: Final = struct.Struct("!HqddH")
_RECORD_FRAME, _MODEL_FRAME, _PREDICTION_FRAME = 0, 1, 2
_NO_KEY: Final = -1
# How long frames gather before one write to the relay: one system call per 5 ms instead of
# one per event loop turn. An event's way to Kafka grows by as much, next to the 50 ms linger.
_FLUSH_SECONDS: Final = 0.005
_STATUS_SECONDS: Final = 0.2
_READ_BYTES: Final = 1 << 20
# Frames the gateway holds for a relay that does not read (stalled, or being restarted):
# past this, new events are counted as dropped, like events past a full spool.
_MAX_BUFFERED_BYTES: Final = 256 * 1024 * 1024
_RESTART_SECONDS: Final = 1.0
# The relay's own start (imports, opening the spool) beside its wait for Kafka.
_START_SECONDS: Final = 30.0


class RelayConfig(BaseModel):
    """What the relay needs to publish: the first line of its standard input."""

    model_config = ConfigDict(frozen=True)

    kafka: KafkaSettings
    spool_path: Path
    spool_max_records: int = Field(ge=1)
    timeout_seconds: float = Field(gt=0)
    """How long Kafka has to acknowledge an event, and the relay to connect at start."""
    predictions_topic: str
    source: PredictionSource = "http"


class FrameWriter:
    """The gateway's side of the relay's input: records and predictions as frames.

    A prediction travels as its figures and its features' JSON; the relay encodes the event
    (``PredictionRecords``), so its id, its time and the fields naming the model are
    written there. A model is described once, in a frame of its own, before its first
    prediction.
    """

    def __init__(self) -> None:
        self._models: dict[ModelKey, int] = {}

    def record(self, topic: str, key: bytes | None, value: bytes) -> bytes:
        """One record as a frame."""
        name = topic.encode()
        key_length = _NO_KEY if key is None else len(key)
        body = _RECORD.size + len(name) + max(key_length, 0) + len(value)
        head = _FRAME.pack(_RECORD_FRAME, body) + _RECORD.pack(len(name), key_length)
        return b"".join((head, name, key or b"", value))

    def predictions(self, answer: Answer) -> list[bytes]:
        """The frames of one answer's predictions (after its model's, the first time)."""
        frames: list[bytes] = []
        index = self._models.get(answer.model)
        if index is None:
            index = self._models[answer.model] = len(self._models)
            frames.append(_model_frame(index, answer.model))
        size, pack = _PREDICTION.size, _PREDICTION.pack
        at_us, latency_ms = answer.occurred_at_us, answer.latency_ms
        for request_id, row, prediction in zip(
            answer.request_ids, answer.rows, answer.predictions, strict=True
        ):
            identifier, features = request_id.encode(), orjson.dumps(row)
            body = size + len(identifier) + len(features)
            frames.append(
                b"".join(
                    (
                        _FRAME.pack(_PREDICTION_FRAME, body),
                        pack(index, at_us, prediction, latency_ms, len(identifier)),
                        identifier,
                        features,
                    )
                )
            )
        return frames

    def models(self) -> list[bytes]:
        """The frames of every model described so far: a new relay reads them first."""
        return [_model_frame(index, model) for model, index in self._models.items()]


def _model_frame(index: int, model: ModelKey) -> bytes:
    described = orjson.dumps(list(model))
    return _FRAME.pack(_MODEL_FRAME, _MODEL.size + len(described)) + _MODEL.pack(index) + described


class FrameReader:
    """The relay's side: records out of its input, read in chunks that need not end on a frame."""

    def __init__(self, predictions: PredictionRecords) -> None:
        self._predictions = predictions
        self._buffer = bytearray()
        self._topics: dict[bytes, str] = {}
        self._models: dict[int, ModelKey] = {}

    def feed(self, chunk: bytes) -> list[SpoolRecord]:
        """The records completed by ``chunk``; a partial frame waits for the next."""
        buffer = self._buffer
        buffer += chunk
        records: list[SpoolRecord] = []
        offset, size = 0, len(buffer)
        while size - offset >= _FRAME.size:
            kind, length = _FRAME.unpack_from(buffer, offset)
            start = offset + _FRAME.size
            end = start + length
            if end > size:
                break
            body = memoryview(buffer)[start:end]
            try:
                if kind == _PREDICTION_FRAME:
                    records.append(self._prediction(body))
                elif kind == _RECORD_FRAME:
                    records.append(self._record(body))
                elif kind == _MODEL_FRAME:
                    self._model(body)
                else:
                    raise ValueError(f"unknown frame kind {kind}")
            finally:
                body.release()
            offset = end
        del buffer[:offset]
        return records

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet complete."""
        return len(self._buffer)

    def _record(self, body: memoryview) -> SpoolRecord:
        topic_length, key_length = _RECORD.unpack_from(body)
        topic_end = _RECORD.size + topic_length
        value_start = topic_end + max(key_length, 0)
        return SpoolRecord(
            self._topic(bytes(body[_RECORD.size : topic_end])),
            None if key_length == _NO_KEY else bytes(body[topic_end:value_start]),
            bytes(body[value_start:]),
        )

    def _model(self, body: memoryview) -> None:
        (index,) = _MODEL.unpack_from(body)
        name, version, run_id = orjson.loads(body[_MODEL.size :])
        self._models[index] = ModelKey(name, version, run_id)

    def _prediction(self, body: memoryview) -> SpoolRecord:
        index, at_us, prediction, latency_ms, id_length = _PREDICTION.unpack_from(body)
        id_end = _PREDICTION.size + id_length
        return self._predictions.record(
            self._models[index],
            datetime_of(at_us),
            bytes(body[_PREDICTION.size : id_end]).decode(),
            orjson.Fragment(bytes(body[id_end:])),
            prediction,
            latency_ms,
        )

    def _topic(self, raw: bytes) -> str:
        topic = self._topics.get(raw)
        if topic is None:
            topic = self._topics[raw] = raw.decode()
        return topic


class RelayPublisher:
    """The gateway's side of the relay: a ``Publisher`` whose work runs in a child process."""

    def __init__(self, config: RelayConfig, *, on_restart: Callable[[], None]) -> None:
        self.config = config
        self._on_restart = on_restart
        self._process: asyncio.subprocess.Process | None = None
        self._writer = FrameWriter()
        self._frames: list[bytes] = []
        # Frames gathered while no relay runs (being restarted), written to the next one.
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self._status = PublisherStatus(state=PublisherState.SPOOLING)
        # Counts of relays that died: their last report, added to the running relay's.
        self._before = PublisherStatus(state=PublisherState.STOPPED)
        self._dropped = 0
        self._dropped_warned = False
        self._stopping = False
        self._first_status: asyncio.Future[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None

    def publish(self, topic: str, event: Event) -> None:
        """Queue an event for ``topic``; returns at once, never raises for Kafka's sake."""
        self.publish_encoded(*encode_record(topic, event))

    def publish_encoded(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue an already encoded event; same promise as ``publish``."""
        self._frames.append(self._writer.record(topic, key, value))
        self._schedule_flush()

    def publish_predictions(self, answer: Answer) -> None:
        """Queue the prediction events of one answer (the hot path); same promise."""
        self._frames += self._writer.predictions(answer)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(_FLUSH_SECONDS, self._flush)

    @property
    def process_id(self) -> int | None:
        """The running relay's process id (None between a relay's death and the next)."""
        return self._process.pid if self._process is not None else None

    def status(self) -> PublisherStatus:
        """The relay's last report, with the counts of relays before it and of drops here."""
        total = self._status.after(self._before)
        return total.model_copy(
            update={
                "state": PublisherState.STOPPED if self._stopping else total.state,
                "spool_capacity": total.spool_capacity or self.config.spool_max_records,
                "spool_dropped": total.spool_dropped + self._dropped,
            }
        )

    async def start(self, *, connect_within_seconds: float) -> None:
        """Start the relay and wait for its first report (it waits for Kafka that long)."""
        loop = asyncio.get_running_loop()
        self._first_status = loop.create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name="relay-supervisor")
        waited = connect_within_seconds + _START_SECONDS
        done, _ = await asyncio.wait({self._first_status}, timeout=waited)
        if done:
            self._first_status.result()  # raises if the relay exited before it started
        else:
            # Served anyway: events are held for it (or counted as dropped past the bound).
            log.error("the publishing relay did not report within %.0f s", waited)

    async def stop(self) -> None:
        """Hand the gathered frames over, close the relay's input and wait for it to finish."""
        self._stopping = True
        self._flush()
        process = self._process
        if process is not None and process.stdin is not None:
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            process.stdin.close()
        if self._supervisor is not None:
            # The relay spools what Kafka did not take within its timeout, then exits.
            deadline = 3 * self.config.timeout_seconds + _START_SECONDS
            done, _ = await asyncio.wait({self._supervisor}, timeout=deadline)
            if not done:
                log.error("the publishing relay did not stop within %.0f s; killing it", deadline)
                if process is not None:
                    process.kill()
                self._supervisor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._supervisor

    def _flush(self) -> None:
        self._flush_handle = None
        if not self._frames:
            return
        frames, self._frames = self._frames, []
        data = b"".join(frames)
        stdin = self._stdin()
        if stdin is None:
            if self._held_bytes + len(data) > _MAX_BUFFERED_BYTES:
                self._drop(len(frames), "no publishing relay runs")
            else:
                self._held.append(data)
                self._held_bytes += len(data)
        elif stdin.transport.get_write_buffer_size() > _MAX_BUFFERED_BYTES:
            self._drop(len(frames), "the publishing relay does not read")
        else:
            stdin.write(data)

    def _stdin(self) -> asyncio.StreamWriter | None:
        process = self._process
        if process is None or process.stdin is None or process.stdin.is_closing():
            return None
        return process.stdin

    def _drop(self, count: int, reason: str) -> None:
        self._dropped += count
        if not self._dropped_warned:
            log.error("%s: %d events dropped (counted as spool drops)", reason, count)
            self._dropped_warned = True

    async def _supervise(self) -> None:
        while True:
            code = await self._run_relay()
            if self._stopping:
                return
            started = self._first_status
            if started is not None and not started.done():
                # It never ran: a setting or the spool is wrong, and restarting will not help.
                started.set_exception(
                    RuntimeError(f"the publishing relay exited with {code} before it started")
                )
                return
            log.error("the publishing relay exited with %s; starting another", code)
            self._on_restart()
            self._before = self._status.after(self._before)
            self._status = PublisherStatus(state=PublisherState.SPOOLING)
            if not self._stopping:
                await asyncio.sleep(_RESTART_SECONDS)

    async def _run_relay(self) -> int:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.relay",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        if process.stdin is None or process.stdout is None:  # both asked for: never None
            raise RuntimeError("the relay's pipes were not opened")
        process.stdin.write(self.config.model_dump_json().encode() + b"\n")
        # The models a relay before it was told of, for the frames held or still to come.
        process.stdin.writelines(self._writer.models())
        process.stdin.writelines(self._held)
        self._held, self._held_bytes = [], 0
        self._process = process
        if self._stopping:
            # Started after its predecessor died during the stop: it takes the held frames
            # over, spools or sends them, and stops.
            process.stdin.close()
        async for line in process.stdout:
            try:
                self._status = PublisherStatus.model_validate_json(line)
            except ValidationError:
                log.warning("the publishing relay wrote a line that is no status: %r", line[:200])
                continue
            if self._first_status is not None and not self._first_status.done():
                self._first_status.set_result(None)
        code = await process.wait()
        self._process = None  # frames from now on are held for the next relay
        return code


async def run_relay(
    config: RelayConfig, reader: asyncio.StreamReader, status_out: BinaryIO
) -> None:
    """The relay's work: publish the records read until end of input, reporting as it goes."""
    spool = Spool(config.spool_path, max_records=config.spool_max_records)
    publisher = EventPublisher(
        config.kafka, spool, timeout_seconds=config.timeout_seconds, client_name="gateway"
    )
    frames = FrameReader(PredictionRecords(config.predictions_topic, config.source))
    await publisher.start(connect_within_seconds=config.timeout_seconds)
    reporter = asyncio.create_task(_report(publisher, status_out), name="relay-status")
    try:
        while chunk := await reader.read(_READ_BYTES):
            for record in frames.feed(chunk):
                publisher.publish_encoded(*record)
        if frames.pending:
            log.error("the relay's input ended inside a frame (%d bytes dropped)", frames.pending)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
        await publisher.stop()
        _write_status(status_out, publisher.status())
        spool.close()


async def _report(publisher: EventPublisher, out: BinaryIO) -> None:
    while True:
        _write_status(out, publisher.status())
        await asyncio.sleep(_STATUS_SECONDS)


def _write_status(out: BinaryIO, status: PublisherStatus) -> None:
    out.write(status.model_dump_json().encode() + b"\n")
    out.flush()


async def _main(status_out: BinaryIO) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2 * _READ_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    config = RelayConfig.model_validate_json(await reader.readline())
    await run_relay(config, reader, status_out)


def main() -> None:
    """``python -m gateway.relay``: started by the gateway, stopped by closing its input."""
    # Ctrl-C or a SIGTERM to the process group reaches the gateway too; the relay keeps
    # reading until the gateway, stopping, closes its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Standard output carries status lines only: anything a library prints goes to
    # standard error instead.
    status_out, sys.stdout = sys.stdout.buffer, sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s relay %(levelname)s %(message)s")
    asyncio.run(_main(status_out))


if __name__ == "__main__":
    main()
