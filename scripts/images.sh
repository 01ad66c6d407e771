#!/usr/bin/env bash
# The stack's images between Docker engines: what `make push`, `make pull` and BUILD=0 do.
#
#   scripts/images.sh check [SERVICE...]  every image the services use (all of them when none is named) is on the
#                                         engine already; else name the missing ones and exit 1 (BUILD=0: nothing
#                                         is built, nothing is pulled behind the user's back)
#   scripts/images.sh push                push every image named under $REGISTRY/ (the ones the stack builds),
#                                         print each pushed digest and write them to $IMAGES_LOCK
#   scripts/images.sh pull                pull every image the stack uses: the ones $IMAGES_LOCK names by their
#                                         pushed digest exactly (then tagged with the name compose uses), any
#                                         other by its name; print each one's digest and image id
#
# Environment: SO8T_COMPOSE, the compose command with its profile flags ("docker compose --profile pipeline"; the
# compose files come from COMPOSE_FILE or .env as compose reads them); REGISTRY; IMAGES_LOCK (default images.lock);
# DOCKER, the docker CLI (default docker). The engine is the docker CLI's: DOCKER_HOST (unix://, ssh://, tcp://) or
# the current context.
set -euo pipefail

read -r -a COMPOSE <<<"${SO8T_COMPOSE:-docker compose --profile pipeline}"
DOCKER="${DOCKER:-docker}"
LOCK="${IMAGES_LOCK:-images.lock}"
REGISTRY="${REGISTRY:-}"

engine() { echo "${DOCKER_HOST:-$("$DOCKER" context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null || echo default)}"; }

answers() {
  "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || { echo "images: no Docker engine answers at $(engine)" >&2; exit 1; }
}

# the images the named services use (every service of the active profiles when none is named), once each
images() { "${COMPOSE[@]}" config --images "$@" | sort -u; }

# the repository of an image reference: registry/name without :tag or @digest
repo_of() {
  local ref="${1%@*}"
  [[ "${ref##*/}" == *:* ]] && ref="${ref%:*}"
  echo "$ref"
}

image_id() { "$DOCKER" image inspect --format '{{.Id}}' "$1"; }

# the digest the engine recorded for image $1 in its own repository, as repo@sha256:...
repo_digest() {
  "$DOCKER" image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$1" | grep -m1 "^$(repo_of "$1")@" || true
}

check() {
  local list image missing=()
  answers
  list="$(images "$@")"
  for image in $list; do
    "$DOCKER" image inspect "$image" >/dev/null 2>&1 || missing+=("$image")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "BUILD=0 builds nothing, and these images are not on the engine at $(engine): ${missing[*]}" >&2
    echo "  pull them (make pull, with REGISTRY=${REGISTRY:-...} in .env as on the box that pushed them)" \
      "or build them (make build, or leave BUILD=0 out)" >&2
    exit 1
  fi
  echo ">> BUILD=0: $(wc -w <<<"$list") image(s) on the engine, none built: $(tr '\n' ' ' <<<"$list")" >&2
}

push() {
  local list image ours=() out ref tmp="$LOCK.tmp"
  [ -n "$REGISTRY" ] || { echo "make push: set REGISTRY=<registry>/<namespace> in .env (images become \$REGISTRY/so8t-cuda etc.)" >&2; exit 2; }
  answers
  list="$(images)"
  for image in $list; do [[ "$image" == "$REGISTRY/"* ]] && ours+=("$image"); done
  [ "${#ours[@]}" -gt 0 ] || { echo "make push: no image of the stack is named under $REGISTRY/ (images: $(tr '\n' ' ' <<<"$list"))" >&2; exit 1; }
  : >"$tmp"
  for image in "${ours[@]}"; do
    echo ">> push $image" >&2
    out="$("$DOCKER" push "$image" | tee >(cat >&2))"  # progress to stderr as it comes
    # the last line of a push: "<tag>: digest: sha256:<hex> size: <bytes>"
    ref="$(repo_of "$image")@$(sed -n 's/.*digest: \(sha256:[0-9a-f]\{64\}\).*/\1/p' <<<"$out" | tail -n1)"
    [[ "$ref" == *@sha256:* ]] || { echo "make push: no digest in docker push's output for $image" >&2; exit 1; }
    printf '%s %s %s\n' "$image" "$ref" "$(image_id "$image")" >>"$tmp"
    echo "pushed $image = $ref (image id $(image_id "$image"))"
  done
  mv "$tmp" "$LOCK"
  echo ">> $LOCK lists these digests: beside the repo on the other box, make pull fetches exactly them" >&2
}

pull() {
  local list image pinned ref
  answers
  list="$(images)"
  [ -f "$LOCK" ] || echo ">> no $LOCK here: pulling by name (tags can move; copy $LOCK from the pushing box to pin)" >&2
  for image in $list; do
    pinned="$(awk -v i="$image" '$1 == i { print $2 }' "$LOCK" 2>/dev/null || true)"
    if [ -n "$pinned" ]; then
      echo ">> pull $pinned (pinned by $LOCK) as $image" >&2
      "$DOCKER" pull "$pinned" >&2
      "$DOCKER" tag "$pinned" "$image"
      ref="$pinned"
    else
      echo ">> pull $image" >&2
      "$DOCKER" pull "$image" >&2
      ref="$(repo_digest "$image")"
    fi
    echo "pulled $image = ${ref:-no digest} (image id $(image_id "$image"))"
  done
}

case "${1:-}" in
  check) shift; check "$@" ;;
  push) push ;;
  pull) pull ;;
  *) sed -n '2,16p' "$0" >&2; exit 2 ;;
esac
