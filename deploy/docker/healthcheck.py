#!/usr/bin/env python3
"""Container health check: exit 0 when an HTTP(S) endpoint answers 2xx, 1 otherwise.

Baked into both images as /usr/local/bin/falco-gitlab-healthcheck, because the python:3.11-slim base has
neither curl nor wget. Standard library only, so it starts in well under a second.

Usage: falco-gitlab-healthcheck [URL]
  URL defaults to $HEALTHCHECK_URL, else http://127.0.0.1:8080/healthz.
  For https://127.0.0.1/... or https://localhost/... the certificate is not verified: the check talks to
  the process in its own container, whose certificate names the public host, not 127.0.0.1.
  $HEALTHCHECK_TIMEOUT (seconds, default 3) bounds the whole request.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8080/healthz"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def check(url: str, timeout: float) -> tuple[bool, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return False, f"unsupported URL scheme in {url!r}"
    context = None
    if parts.scheme == "https" and parts.hostname in LOCAL_HOSTS:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers={"User-Agent": "falco-gitlab-healthcheck"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        return False, f"{url}: HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"
    if 200 <= status < 300:
        return True, f"{url}: HTTP {status}"
    return False, f"{url}: HTTP {status}"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("HEALTHCHECK_URL", DEFAULT_URL)
    try:
        timeout = float(os.environ.get("HEALTHCHECK_TIMEOUT", "3"))
    except ValueError:
        timeout = 3.0
    ok, message = check(url, timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
