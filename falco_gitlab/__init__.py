"""Shared contract and tooling of the GitLab audit events → Kafka → Falco pipeline."""

__version__ = "0.1.0"
