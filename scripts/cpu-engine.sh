#!/usr/bin/env bash
# A private Docker engine for the CPU stack (make images-cpu, make stack-test): Debian's dockerd (package docker.io)
# with host networking only (--bridge=none --iptables=false) and its own data root, exec root and socket, so no other
# engine on the machine is disturbed. Needs root.
#
#   scripts/cpu-engine.sh start       start it unless it answers (installs docker.io when absent); prints DOCKER_HOST
#   scripts/cpu-engine.sh host        print DOCKER_HOST=unix://... for this engine
#   scripts/cpu-engine.sh stop        SIGTERM to dockerd, as an orderly host shutdown: it stops the containers, exits
#   scripts/cpu-engine.sh power-cut   SIGKILL, all at once, of dockerd, its containerd, every container shim and every
#                                     process in the containers: what a host power loss leaves behind
#
# The state lives in $SO8T_DOCKER_DIR (default /var/tmp/so8t-docker): images built there stay for the next call.
set -euo pipefail

DIR="${SO8T_DOCKER_DIR:-/var/tmp/so8t-docker}"
SOCK="$DIR/docker.sock"
EXEC="$DIR/exec"
HOST="unix://$SOCK"
DOCKERD="${SO8T_DOCKERD:-/usr/sbin/dockerd}"
DOCKER="${SO8T_DOCKER_CLI:-/usr/bin/docker}"   # Debian's 20.10 client, which matches the daemon

answers() { [ -S "$SOCK" ] && "$DOCKER" -H "$HOST" info >/dev/null 2>&1; }

# a process that runs (a killed one may linger as a zombie until its new parent reaps it: that one does not)
alive() { [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat")" != Z ]; }

# dockerd, its containerd, the shims (found by their -address argument: after a kill they belong to PID 1) and,
# recursively, the processes they started
engine_pids() {
  local pids=() todo=() p
  [ -f "$DIR/docker.pid" ] && pids+=("$(cat "$DIR/docker.pid")")
  mapfile -t todo < <(pgrep -f -- "(containerd --config $EXEC/|-address $EXEC/containerd/)" || true)
  while [ "${#todo[@]}" -gt 0 ]; do
    p="${todo[0]}"; todo=("${todo[@]:1}")
    pids+=("$p")
    mapfile -t -O "${#todo[@]}" todo < <(pgrep -P "$p" || true)
  done
  printf '%s\n' "${pids[@]}" | sort -un
}

case "${1:-}" in
  host)
    echo "DOCKER_HOST=$HOST" ;;
  start)
    [ "$(id -u)" = 0 ] || { echo "cpu-engine: needs root (dockerd)" >&2; exit 77; }
    if ! [ -x "$DOCKERD" ]; then
      echo ">> installing Debian's docker.io" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >&2 || { echo "cpu-engine: cannot install docker.io" >&2; exit 77; }
    fi
    if ! answers; then
      mkdir -p "$DIR/root" "$EXEC"
      # what a boot clears (a tmpfs /run on a real host): the pid files of a daemon and containerd the power cut
      # killed. Here a killed process lingers as a zombie until PID 1 reaps it, and dockerd takes a pid file naming
      # one for a running daemon (or containerd) and refuses to start, or waits for it.
      for pidfile in "$DIR/docker.pid" "$EXEC/containerd/containerd.pid"; do
        if [ -f "$pidfile" ] && ! alive "$(cat "$pidfile")"; then rm -f "$pidfile"; fi
      done
      echo ">> starting dockerd ($DIR, socket $SOCK)" >&2
      nohup "$DOCKERD" --bridge=none --iptables=false --ip-masq=false --data-root "$DIR/root" --exec-root "$EXEC" \
        -H "$HOST" --pidfile "$DIR/docker.pid" >>"$DIR/dockerd.log" 2>&1 &
      for _ in $(seq 1 360); do answers && break; sleep 0.5; done
      answers || { echo "cpu-engine: dockerd did not answer; see $DIR/dockerd.log" >&2; tail -20 "$DIR/dockerd.log" >&2; exit 1; }
    fi
    echo "DOCKER_HOST=$HOST" ;;
  stop)
    if [ -f "$DIR/docker.pid" ] && kill -0 "$(cat "$DIR/docker.pid")" 2>/dev/null; then
      pid="$(cat "$DIR/docker.pid")"
      kill -TERM "$pid"
      for _ in $(seq 1 600); do alive "$pid" || break; sleep 0.5; done
    fi ;;
  power-cut)
    mapfile -t pids < <(engine_pids)
    [ "${#pids[@]}" -gt 0 ] && kill -KILL "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 100); do  # until every one of them is gone (or a zombie)
      left=0; for p in "${pids[@]}"; do alive "$p" && left=1; done
      [ "$left" = 0 ] && break; sleep 0.1
    done
    echo "cut: ${#pids[@]} processes" ;;
  *)
    sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
