"""The [kafka.security] settings shared by ingest and enrich, and their aiokafka and librdkafka forms."""

from pathlib import Path

import msgspec
import pytest

from falco_gitlab.config import ConfigError
from falco_gitlab.kafka_security import KafkaSecurity, aiokafka_security_options, librdkafka_security_options


def test_plaintext_needs_nothing_else() -> None:
    assert aiokafka_security_options(KafkaSecurity()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_password_is_read_from_its_file(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("s3cret-from-file\n")
    options = aiokafka_security_options(KafkaSecurity(
        protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512", sasl_username="falco",
        sasl_password_file=str(secret)))
    assert options == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                       "sasl_plain_username": "falco", "sasl_plain_password": "s3cret-from-file"}


def test_missing_secret_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sasl_password_file"):
        aiokafka_security_options(KafkaSecurity(protocol="SASL_SSL", sasl_username="falco",
                                                sasl_password_file=str(tmp_path / "absent")))


def test_unknown_keys_and_protocols_are_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `sasl_pasword`"):
        msgspec.convert({"sasl_pasword": "x"}, KafkaSecurity)
    with pytest.raises(msgspec.ValidationError, match="protocol"):
        msgspec.convert({"protocol": "TLS"}, KafkaSecurity)


def test_librdkafka_translation_of_tls_and_sasl(tmp_path: Path) -> None:
    secret = tmp_path / "kafka-password"
    secret.write_text("s3cret-from-file\n")
    key_password = tmp_path / "key-password"
    key_password.write_text("k3y\n")
    options = librdkafka_security_options(KafkaSecurity(
        protocol="SASL_SSL", ssl_cafile="/etc/ca.pem", ssl_keyfile="/etc/client.key",
        ssl_certfile="/etc/client.pem", ssl_key_password_file=str(key_password), ssl_check_hostname=False,
        sasl_mechanism="SCRAM-SHA-256", sasl_username="falco", sasl_password_file=str(secret)))
    assert options == {
        "security.protocol": "SASL_SSL", "ssl.ca.location": "/etc/ca.pem",
        "ssl.certificate.location": "/etc/client.pem", "ssl.key.location": "/etc/client.key",
        "ssl.key.password": "k3y", "ssl.endpoint.identification.algorithm": "none",
        "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "falco", "sasl.password": "s3cret-from-file"}
    assert librdkafka_security_options(KafkaSecurity()) == {"security.protocol": "PLAINTEXT"}


def test_librdkafka_options_are_accepted_by_librdkafka() -> None:
    from confluent_kafka import Producer

    options = librdkafka_security_options(KafkaSecurity(
        protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="falco", sasl_password="x"))
    # librdkafka validates every property name and value at creation (no connection is made).
    Producer({"bootstrap.servers": "127.0.0.1:1", **options}).close()
