#!/usr/bin/env bash
# Creates the platform's Kafka topics on Redpanda; run by the redpanda-init service.
# The list mirrors schemas/topics.py (topic_specs): tests/unit/test_compose.py fails when the
# two differ. Data topics have 3 partitions, control topics 1, each `<topic>.dlq` 1; data
# topics are kept 7 days, dead-letter topics 14 days so bad messages can be replayed.
# Safe to re-run: an existing topic keeps its partitions and gets its retention set again.
set -euo pipefail

brokers="${KAFKA_BOOTSTRAP_SERVERS:-redpanda:9092}"
existing="$(rpk topic list -X "brokers=${brokers}" | awk 'NR > 1 { print $1 }')"

create_topic() {
  local name="$1" partitions="$2" retention_ms="$3"
  if grep -qxF "$name" <<<"$existing"; then
    rpk topic alter-config "$name" --set "retention.ms=${retention_ms}" -X "brokers=${brokers}"
  else
    rpk topic create "$name" --partitions "$partitions" --replicas 1 \
      --topic-config "retention.ms=${retention_ms}" -X "brokers=${brokers}"
  fi
}

create_topic predictions 3 604800000
create_topic predictions.dlq 1 1209600000
create_topic labels 3 604800000
create_topic labels.dlq 1 1209600000
create_topic scoring.requests 3 604800000
create_topic scoring.requests.dlq 1 1209600000
create_topic scoring.results 3 604800000
create_topic scoring.results.dlq 1 1209600000
create_topic drift.events 1 604800000
create_topic drift.events.dlq 1 1209600000
create_topic model.events 1 604800000
create_topic model.events.dlq 1 1209600000

rpk topic list -X "brokers=${brokers}"
