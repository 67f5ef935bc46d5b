#!/usr/bin/env bash
# Create, or bring back to the wanted settings, the pipeline's three Kafka topics. Idempotent: safe to
# run on every deployment. Runs in the official apache/kafka image (tools in /opt/kafka/bin).
#
# Used by the `kafka-init` service of deploy/compose/compose.yaml and by the `kafka-topics` Job of
# deploy/kubernetes/base. Settings come from the environment:
#
#   BOOTSTRAP_SERVERS       required, e.g. kafka:9092
#   PARTITIONS              6       partitions of each topic (= most enrich workers / Falco consumers
#                                   that can share the work; see docs/operations.md, "Scaling")
#   REPLICATION_FACTOR      3       1 for a single-broker development cluster
#   MIN_INSYNC_REPLICAS     2       1 for a single broker; producers use acks=all
#   RAW_RETENTION_MS        604800000   (7 days)   gitlab.audit.raw
#   ENRICHED_RETENTION_MS   2592000000  (30 days)  gitlab.audit.enriched: the replay window
#   DLQ_RETENTION_MS        2592000000  (30 days)  gitlab.audit.dlq
#   MAX_MESSAGE_BYTES       33554432    (32 MiB)   GitLab bodies reach 25 MB; >= every producer's limit
#   ALLOW_PARTITION_INCREASE false  true: grow an existing topic to PARTITIONS (re-maps keys; see docs)
#   COMMAND_CONFIG          ""      client properties file (TLS/SASL) passed as --command-config
#   KAFKA_BIN               /opt/kafka/bin
#   WAIT_TIMEOUT_S          180     how long to wait for the brokers to answer
set -euo pipefail

: "${BOOTSTRAP_SERVERS:?BOOTSTRAP_SERVERS must be set}"
PARTITIONS="${PARTITIONS:-6}"
REPLICATION_FACTOR="${REPLICATION_FACTOR:-3}"
MIN_INSYNC_REPLICAS="${MIN_INSYNC_REPLICAS:-2}"
RAW_RETENTION_MS="${RAW_RETENTION_MS:-604800000}"
ENRICHED_RETENTION_MS="${ENRICHED_RETENTION_MS:-2592000000}"
DLQ_RETENTION_MS="${DLQ_RETENTION_MS:-2592000000}"
MAX_MESSAGE_BYTES="${MAX_MESSAGE_BYTES:-33554432}"
ALLOW_PARTITION_INCREASE="${ALLOW_PARTITION_INCREASE:-false}"
COMMAND_CONFIG="${COMMAND_CONFIG:-}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"
WAIT_TIMEOUT_S="${WAIT_TIMEOUT_S:-180}"

log() { printf '%s create-topics: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

for var in PARTITIONS REPLICATION_FACTOR MIN_INSYNC_REPLICAS RAW_RETENTION_MS ENRICHED_RETENTION_MS \
           DLQ_RETENTION_MS MAX_MESSAGE_BYTES WAIT_TIMEOUT_S; do
    if ! [[ "${!var}" =~ ^-?[0-9]+$ ]]; then
        log "$var must be an integer (got '${!var}')"
        exit 2
    fi
done
if (( MIN_INSYNC_REPLICAS > REPLICATION_FACTOR )); then
    log "MIN_INSYNC_REPLICAS ($MIN_INSYNC_REPLICAS) > REPLICATION_FACTOR ($REPLICATION_FACTOR): acks=all producers could never write"
    exit 2
fi

client=(--bootstrap-server "$BOOTSTRAP_SERVERS")
if [[ -n "$COMMAND_CONFIG" ]]; then
    client+=(--command-config "$COMMAND_CONFIG")
fi

log "waiting for the brokers at $BOOTSTRAP_SERVERS (up to ${WAIT_TIMEOUT_S}s)"
deadline=$(( $(date +%s) + WAIT_TIMEOUT_S ))
until "$KAFKA_BIN/kafka-topics.sh" "${client[@]}" --list > /dev/null 2>&1; do
    if (( $(date +%s) >= deadline )); then
        log "brokers did not answer within ${WAIT_TIMEOUT_S}s"
        exit 1
    fi
    sleep 3
done

ensure_topic() {
    local topic="$1" retention_ms="$2" settings current
    settings="retention.ms=${retention_ms},min.insync.replicas=${MIN_INSYNC_REPLICAS},max.message.bytes=${MAX_MESSAGE_BYTES},cleanup.policy=delete"
    log "topic $topic: partitions=$PARTITIONS replication=$REPLICATION_FACTOR $settings"
    "$KAFKA_BIN/kafka-topics.sh" "${client[@]}" --create --if-not-exists --topic "$topic" \
        --partitions "$PARTITIONS" --replication-factor "$REPLICATION_FACTOR" \
        --config "retention.ms=${retention_ms}" \
        --config "min.insync.replicas=${MIN_INSYNC_REPLICAS}" \
        --config "max.message.bytes=${MAX_MESSAGE_BYTES}" \
        --config "cleanup.policy=delete"
    # --if-not-exists leaves an existing topic alone: converge its settings explicitly.
    "$KAFKA_BIN/kafka-configs.sh" "${client[@]}" --alter --entity-type topics --entity-name "$topic" \
        --add-config "$settings" > /dev/null
    current=$("$KAFKA_BIN/kafka-topics.sh" "${client[@]}" --describe --topic "$topic" \
        | sed -n 's/.*PartitionCount:[[:space:]]*\([0-9][0-9]*\).*/\1/p' | head -n 1)
    if [[ -z "$current" ]]; then
        log "topic $topic: could not read its partition count"
        exit 1
    fi
    if (( current < PARTITIONS )); then
        if [[ "$ALLOW_PARTITION_INCREASE" == "true" ]]; then
            log "topic $topic: growing from $current to $PARTITIONS partitions"
            "$KAFKA_BIN/kafka-topics.sh" "${client[@]}" --alter --topic "$topic" --partitions "$PARTITIONS"
        else
            log "topic $topic has $current partitions, fewer than PARTITIONS=$PARTITIONS; left as is" \
                "(set ALLOW_PARTITION_INCREASE=true to grow it, see docs/operations.md)"
        fi
    elif (( current > PARTITIONS )); then
        log "topic $topic has $current partitions (> $PARTITIONS); Kafka cannot shrink a topic, left as is"
    fi
}

ensure_topic gitlab.audit.raw "$RAW_RETENTION_MS"
ensure_topic gitlab.audit.enriched "$ENRICHED_RETENTION_MS"
ensure_topic gitlab.audit.dlq "$DLQ_RETENTION_MS"
log "done"
