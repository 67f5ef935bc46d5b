"""ingest: the GitLab audit event streaming receiver (HTTP -> Kafka ``gitlab.audit.raw``)."""
