"""``driftloop dlq list|replay``: inspect dead letters and send them back after a fix.

A replay re-publishes each letter's original bytes and key to its source topic. The consumers
are idempotent (the feature logger by request id, batch results are de-duplicated by their
readers), so replaying a range twice is harmless; a letter that is still bad lands in the
dead-letter topic again. ``--from-offset``/``--to-offset`` select a range seen with ``list``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import typer
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console
from rich.table import Table

from driftloop.events import kafka
from driftloop.settings import KafkaSettings, SettingsError, load_settings
from schemas.events import DeadLetter, EventDecodeError, FailureKind
from schemas.topics import Topic

dlq_app = typer.Typer(help="Dead letters: list and replay what consumers could not handle.")
console = Console()


@dataclass(frozen=True, slots=True)
class StoredLetter:
    """A dead letter and where it sits in its dead-letter topic."""

    partition: int
    offset: int
    letter: DeadLetter


async def read_dead_letters(settings: KafkaSettings, topic: Topic) -> list[StoredLetter]:
    """Every dead letter of ``topic`` present now, oldest first (no consumer group)."""
    name = settings.topic(topic.dead_letter)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id_prefix}-dlq-cli",
        enable_auto_commit=False,
    )
    await kafka.start_with_retry(consumer, settings, give_up_after_seconds=30)
    try:
        # A consumer without subscriptions knows no topic yet; aiokafka has no public refresh.
        await consumer._client.force_metadata_update()
        partitions = [
            TopicPartition(name, partition)
            for partition in sorted(consumer.partitions_for_topic(name) or ())
        ]
        if not partitions:
            return []
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.seek_to_beginning(*partitions)
        letters: list[StoredLetter] = []
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    try:
                        letter = DeadLetter.from_bytes(record.value or b"")
                    except EventDecodeError as error:
                        console.print(f"[yellow]{name}@{record.offset}: not a dead letter: {error}")
                        continue
                    letters.append(StoredLetter(tp.partition, record.offset, letter))
        return sorted(letters, key=lambda stored: (stored.partition, stored.offset))
    finally:
        await consumer.stop()


def select(
    letters: list[StoredLetter],
    *,
    from_offset: int = 0,
    to_offset: int | None = None,
    failure: FailureKind | None = None,
) -> list[StoredLetter]:
    """The letters in an offset range (inclusive) and of one failure kind, when given."""
    return [
        stored
        for stored in letters
        if stored.offset >= from_offset
        and (to_offset is None or stored.offset <= to_offset)
        and (failure is None or stored.letter.failure is failure)
    ]


async def replay_dead_letters(settings: KafkaSettings, letters: list[StoredLetter]) -> int:
    """Re-publish the letters' original messages to their source topics; returns how many."""
    producer = kafka.producer(settings, "dlq-replay")
    await kafka.start_with_retry(producer, settings, give_up_after_seconds=30)
    try:
        sent = [
            await producer.send(
                stored.letter.source_topic,
                stored.letter.original_value,
                key=stored.letter.original_key,
            )
            for stored in letters
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return len(letters)


def _settings() -> KafkaSettings:
    try:
        return load_settings(KafkaSettings)
    except SettingsError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from None


def _topic(value: str) -> Topic:
    try:
        return Topic(value.removesuffix(".dlq"))
    except ValueError:
        known = ", ".join(topic.value for topic in Topic)
        console.print(f"[red]unknown topic {value!r}; one of: {known}[/red]")
        raise typer.Exit(2) from None


@dlq_app.command("list")
def list_letters(
    topic: str = typer.Argument(..., help="Logical topic, e.g. predictions or labels."),
    failure: FailureKind | None = typer.Option(None, help="Only this failure kind."),
    limit: int = typer.Option(50, min=1, help="Show at most this many (the newest)."),
) -> None:
    """Show the dead letters of a topic: where they came from and why they failed."""
    settings = _settings()
    letters = select(asyncio.run(read_dead_letters(settings, _topic(topic))), failure=failure)
    table = Table(title=f"{settings.topic(_topic(topic).dead_letter)}: {len(letters)} letters")
    for column in ("offset", "failed at", "failure", "source", "group", "reason"):
        table.add_column(column)
    for stored in letters[-limit:]:
        letter = stored.letter
        table.add_row(
            f"{stored.partition}:{stored.offset}",
            letter.failed_at.isoformat(timespec="seconds"),
            letter.failure.value,
            f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}",
            letter.consumer_group,
            letter.reason[:160],
        )
    console.print(table)


@dlq_app.command()
def replay(
    topic: str = typer.Argument(..., help="Logical topic, e.g. predictions or labels."),
    from_offset: int = typer.Option(0, min=0, help="First dead-letter offset to replay."),
    to_offset: int | None = typer.Option(None, min=0, help="Last one (default: the newest)."),
    failure: FailureKind | None = typer.Option(None, help="Only this failure kind."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be replayed."),
) -> None:
    """Send dead letters back to their source topic, e.g. after a consumer was fixed."""
    settings = _settings()
    letters = select(
        asyncio.run(read_dead_letters(settings, _topic(topic))),
        from_offset=from_offset,
        to_offset=to_offset,
        failure=failure,
    )
    if dry_run:
        console.print(f"would replay {len(letters)} dead letters")
        return
    count = asyncio.run(replay_dead_letters(settings, letters))
    console.print(f"replayed {count} dead letters to their source topics")
