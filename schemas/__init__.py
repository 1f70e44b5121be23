"""Contracts of the platform: Kafka topics, versioned events, feature declarations."""
