"""Kafka as every driftloop process uses it: clients, the consumer loop, the spool."""
