"""TLS and SASL towards the Kafka brokers: one settings Struct shared by ingest and enrich, translated for
aiokafka (enrich) and librdkafka (ingest's producer). The plugin has its own keys, see docs/plugin.md."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from falco_gitlab.config import read_secret


class KafkaSecurity(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[kafka.security]`` section of the ingest and enrich configurations."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password_file: str | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: str | None = None
    sasl_password_file: str | None = None


def aiokafka_security_options(security: KafkaSecurity) -> dict[str, Any]:
    """Keyword arguments for an aiokafka client; secret files are read here, at client creation."""
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        key_password = read_secret(
            None, security.ssl_key_password_file, "kafka.security.ssl_key_password_file")
        context = create_ssl_context(cafile=security.ssl_cafile, certfile=security.ssl_certfile,
                                     keyfile=security.ssl_keyfile, password=key_password)
        context.check_hostname = security.ssl_check_hostname
        options["ssl_context"] = context
    if security.protocol.startswith("SASL"):
        options["sasl_mechanism"] = security.sasl_mechanism
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = read_secret(
            security.sasl_password, security.sasl_password_file, "kafka.security.sasl_password_file")
    return options


def librdkafka_security_options(security: KafkaSecurity) -> dict[str, str]:
    """The same settings as librdkafka properties (for confluent-kafka clients); secret files are read
    here, at client creation."""
    options: dict[str, str] = {"security.protocol": security.protocol}
    if security.protocol in ("SSL", "SASL_SSL"):
        paths = {"ssl.ca.location": security.ssl_cafile, "ssl.certificate.location": security.ssl_certfile,
                 "ssl.key.location": security.ssl_keyfile}
        options.update({key: path for key, path in paths.items() if path})
        key_password = read_secret(
            None, security.ssl_key_password_file, "kafka.security.ssl_key_password_file")
        if key_password:
            options["ssl.key.password"] = key_password
        options["ssl.endpoint.identification.algorithm"] = "https" if security.ssl_check_hostname else "none"
    if security.protocol.startswith("SASL"):
        options["sasl.mechanism"] = security.sasl_mechanism
        if security.sasl_username is not None:
            options["sasl.username"] = security.sasl_username
        password = read_secret(
            security.sasl_password, security.sasl_password_file, "kafka.security.sasl_password_file")
        if password is not None:
            options["sasl.password"] = password
    return options
