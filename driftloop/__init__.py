"""Shared core of the driftloop services: settings, Kafka, storage and the native stack."""
