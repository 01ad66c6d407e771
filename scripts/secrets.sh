#!/usr/bin/env bash
# make secrets: what the think API's container needs beside the data volume, created when absent (never replaced):
#   ./secrets/server.secret   the server secret (64 hex digits): keys the thinking's hash and the audit chain
#   ./secrets/api_key         the API key clients send (Authorization: Bearer <key>)
#   ./state/audit/            the audit log's folder (0700)
#   ./state/anchor/           the audit head anchor's folder (0700), apart from the log
#   ./state/secret/           the CPU stack's think API's own secret folder (0700)
# all owned by SO8T_UID:SO8T_GID, the user the containers run as
# Paths come from SO8T_SECRET_PATH, SO8T_API_KEY_PATH, SO8T_AUDIT_DIR, SO8T_ANCHOR_DIR (as in compose.yaml).
set -euo pipefail
umask 077
host="${DOCKER_HOST:-$(docker context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null || true)}"
case "$host" in ssh://*|tcp://*)
  echo ">> Docker engine at $host: the paths below are on that machine; create them there (files 0600, folders 0700," \
       "owned by uid ${SO8T_UID:-$(id -u)}): ${SO8T_SECRET_PATH:-./secrets/server.secret} (64 hex digits)," \
       "${SO8T_API_KEY_PATH:-./secrets/api_key}, ${SO8T_AUDIT_DIR:-./state/audit}, ${SO8T_ANCHOR_DIR:-./state/anchor}"
  exit 0;;
esac
secret="${SO8T_SECRET_PATH:-./secrets/server.secret}"
key="${SO8T_API_KEY_PATH:-./secrets/api_key}"
for f in "$secret" "$key"; do
  mkdir -p "$(dirname "$f")"
  if [[ ! -s "$f" ]]; then
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$f"
    echo >> "$f"
    echo ">> created $f (0600)"
  fi
done
# the CPU stack's think API makes its own secret in ${SO8T_SECRET_DIR:-./state/secret}
for d in "${SO8T_AUDIT_DIR:-./state/audit}" "${SO8T_ANCHOR_DIR:-./state/anchor}" "${SO8T_SECRET_DIR:-./state/secret}"; do
  mkdir -p "$d"
  chmod 700 "$d"
done
# the containers run as SO8T_UID:SO8T_GID (the Makefile exports them): a root `make` hands them what they must read
# and write, or the think API could not read its secret nor open its audit log (and would restart forever)
owner="${SO8T_UID:-$(id -u)}:${SO8T_GID:-$(id -g)}"
if [[ "$(id -u)" == 0 ]]; then
  chown "$owner" "$secret" "$key" "${SO8T_AUDIT_DIR:-./state/audit}" "${SO8T_ANCHOR_DIR:-./state/anchor}" \
    "${SO8T_SECRET_DIR:-./state/secret}"
fi
echo ">> API key for clients: $key (Authorization: Bearer \$(cat $key))"
