#!/usr/bin/env bash
# One-time set-up of deploy/compose: the secrets compose.yaml mounts, never committed.
#
#   ./init.sh [PUBLIC_HOSTNAME]
#
# Creates, only where missing (re-running never overwrites anything):
#   secrets/gitlab-instance.token  verification token for the instance-level streaming destination
#   secrets/gitlab-group.token     verification token for a top-level group destination
#   secrets/proxy-tls.crt/.key     self-signed certificate for the proxy, for PUBLIC_HOSTNAME
#                                  (default: this host's FQDN). Replace with a CA-signed pair for
#                                  GitLab: it verifies the certificate (docs/operations.md, "TLS").
#   secrets/maxmind-account-id     placeholders for the optional geoipupdate service
#   secrets/maxmind-license-key
#   .env                           copied from .env.example
#
# Tokens: 18 random bytes in base64 = 24 characters, the longest GitLab accepts (16-24), with the
# same alphabet as GitLab's own generated tokens. Paste each into its GitLab destination
# (docs/gitlab-setup.md).
set -euo pipefail
cd "$(dirname "$0")"
umask 077

host="${1:-$(hostname -f 2>/dev/null || hostname)}"
command -v openssl > /dev/null || { echo "init.sh: openssl is required" >&2; exit 1; }
mkdir -p secrets geoip
chmod 700 secrets

# Container users must be able to read the mounted files: compose (without swarm) bind-mounts secret
# files with their host permissions. The directory stays private to you; ingest runs as uid 10001.
share_with_containers() {
    if [ "$(id -u)" = 0 ]; then
        chown 10001:10001 "$1" && chmod 0400 "$1"
    else
        chmod 0644 "$1"
    fi
}

new_token() {
    local file="secrets/$1.token"
    if [ -s "$file" ]; then
        echo "kept    $file"
        return
    fi
    openssl rand -base64 18 > "$file"
    share_with_containers "$file"
    echo "created $file  (cat it and paste it as the destination's verification token)"
}

new_token gitlab-instance
new_token gitlab-group

if [ -s secrets/proxy-tls.crt ] && [ -s secrets/proxy-tls.key ]; then
    echo "kept    secrets/proxy-tls.crt, secrets/proxy-tls.key"
else
    openssl req -x509 -newkey rsa:3072 -sha256 -days 365 -nodes \
        -keyout secrets/proxy-tls.key -out secrets/proxy-tls.crt \
        -subj "/CN=${host}" -addext "subjectAltName=DNS:${host},DNS:localhost,IP:127.0.0.1" 2> /dev/null
    chmod 0644 secrets/proxy-tls.crt
    chmod 0600 secrets/proxy-tls.key   # read by nginx's master process, which runs as root
    echo "created secrets/proxy-tls.crt, secrets/proxy-tls.key  (self-signed for ${host})"
fi

for f in maxmind-account-id maxmind-license-key; do
    if [ ! -e "secrets/$f" ]; then
        echo "REPLACE_ME" > "secrets/$f"
        share_with_containers "secrets/$f"
        echo "created secrets/$f  (placeholder; only used with --profile geoip)"
    fi
done

if [ ! -e .env ]; then
    cp .env.example .env
    chmod 0644 .env
    echo "created .env (from .env.example)"
fi

cat <<'MSG'

Next:
  docker compose up -d --build
  docker compose ps                 # kafka-init "exited (0)", everything else "healthy"
  # a test event (more in docs/gitlab-setup.md, "Test with curl"):
  curl -ksS -w '%{http_code}\n' -X POST https://127.0.0.1:8443/ \
       -H "X-Gitlab-Event-Streaming-Token: $(head -n1 secrets/gitlab-instance.token)" \
       -H 'X-Gitlab-Audit-Event-Type: user_access_locked' \
       -H 'Content-Type: application/x-www-form-urlencoded' \
       --data-binary '{"id":1,"author_id":-1,"entity_id":1,"entity_type":"User","event_type":"user_access_locked","details":{"author_name":"mallory","ip_address":"203.0.113.7","custom_message":"User access locked"},"ip_address":"203.0.113.7","author_name":"mallory","entity_path":"mallory","created_at":"2025-01-01T00:00:00.000Z"}'
  docker compose logs -f falco
MSG
