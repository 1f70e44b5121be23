"""Kafka consumers of the platform, one module per deployable: ``python -m consumers.<name>``."""
