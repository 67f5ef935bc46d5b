"""Package data of the local development Kafka broker: ``pom.xml`` pins the Apache Kafka release whose jars
:mod:`falco_gitlab.devkafka` resolves with Maven and runs with plain ``java``."""
