"""The Falco source plugin ``gitlabkafka``: GitLab audit events from Kafka into Falco (source ``gitlab``).

The plugin is a shared library (``libgitlabkafka.so``) built by ``falco-gitlab plugin build``: a small
static C part (metadata, libpython set-up, marshalling; ``plugin_shim.c``) and the Python
implementation in this package, run by an embedded CPython through cffi's embedding mode.

Only constants live here, so that importing the package (and the ``falco-gitlab`` CLI) stays cheap.
"""

from __future__ import annotations

from typing import Final

PLUGIN_NAME: Final = "gitlabkafka"
LIBRARY_NAME: Final = "libgitlabkafka.so"
EVENT_SOURCE: Final = "gitlab"
# 999 is the registry's shared development ID; a production build passes its registered ID.
DEFAULT_PLUGIN_ID: Final = 999
# Plugin API 3.10.0 is implemented by Falco 0.40 and newer (framework minor >= plugin minor).
REQUIRED_API_VERSION: Final = "3.10.0"
# Name of the cffi module compiled into the library (its extern "Python" functions live there).
CFFI_MODULE_NAME: Final = "_gitlabkafka_cffi"

ENV_VENV: Final = "FALCO_GITLAB_VENV"
ENV_PYTHONPATH: Final = "FALCO_GITLAB_PYTHONPATH"
