#!/usr/bin/env bash
# Build smslab's container images on a machine that has no container registry.
#
#   smslab/debian:bookworm  debootstrap --variant=minbase + docker import (no registry needed)
#   smslab/python:3.11      Debian's python3 3.11 with venv        (docker/python/Dockerfile)
#   smslab/rabbitmq:3       Debian's rabbitmq-server + management  (docker/rabbitmq/Dockerfile)
#   smslab/site:latest      the smslab package, from wheels built on the host (./Dockerfile)
#
# Installs Debian's docker.io, docker-compose and debootstrap if missing and starts dockerd if no
# engine answers (by hand, in the background, when systemd is absent). Idempotent: an image that
# exists is kept; --rebuild rebuilds all four. The debootstrap tarball and the wheels are cached in
# $SMSLAB_IMAGE_CACHE (default ~/.cache/smslab-images), so a second run takes seconds.
# See docker/README.md.
set -euo pipefail
set -o errtrace   # the ERR trap below also fires inside functions

usage() {
    cat <<'EOF'
usage: scripts/build-local-images.sh [--rebuild] [--rebuild-site] [--refresh-cache] [-h]

  --rebuild        rebuild all four images (docker build --no-cache), even if they exist
  --rebuild-site   rebuild only smslab/site:latest (after a change to the package)
  --refresh-cache  also drop the cached debootstrap tarball and wheels (implies --rebuild)

environment:
  SMSLAB_IMAGE_CACHE      cache directory (default ~/.cache/smslab-images)
  SMSLAB_DEBIAN_MIRROR    Debian mirror (default http://deb.debian.org/debian)
  SMSLAB_DEBIAN_SECURITY  security mirror (default http://deb.debian.org/debian-security)
  SMSLAB_DOCKERD_LOG      log of a dockerd started by this script (default /var/log/smslab-dockerd.log)
  SMSLAB_DOCKERD_ARGS     extra dockerd arguments (e.g. "--storage-driver=vfs")
  DOCKER                  docker client to use (default: docker)
EOF
}

REBUILD_ALL=0
REBUILD_SITE=0
REFRESH_CACHE=0
for arg in "$@"; do
    case "$arg" in
        --rebuild) REBUILD_ALL=1 ;;
        --rebuild-site) REBUILD_SITE=1 ;;
        --refresh-cache) REFRESH_CACHE=1; REBUILD_ALL=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "build-local-images: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SMSLAB_IMAGE_CACHE:-${HOME:-/root}/.cache/smslab-images}"
MIRROR="${SMSLAB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SMSLAB_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
SUITE=bookworm
DOCKERD_LOG="${SMSLAB_DOCKERD_LOG:-/var/log/smslab-dockerd.log}"
DOCKER="${DOCKER:-docker}"

IMG_DEBIAN=smslab/debian:bookworm
IMG_PYTHON=smslab/python:3.11
IMG_RABBITMQ=smslab/rabbitmq:3
IMG_SITE=smslab/site:latest
ROOTFS_TAR="$CACHE/debian-$SUITE-minbase.tar.gz"

START_ALL=$(date +%s)
log() { printf '[build-local-images %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
warn() { printf '[build-local-images %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[build-local-images] ERROR: %s\n' "$*" >&2; exit 1; }
run() { log "+ $*"; "$@"; }
on_error() {
    local rc=$1 line=$2 cmd=$3
    printf '[build-local-images] ERROR: exit %s at line %s: %s\n' "$rc" "$line" "$cmd" >&2
    printf '[build-local-images] nothing half-built is tagged; fix the cause and run the script again\n' >&2
    exit "$rc"
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

if [[ $EUID -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        log "not root: re-running under sudo (apt-get, dockerd and debootstrap need root)"
        exec sudo --preserve-env=SMSLAB_IMAGE_CACHE,SMSLAB_DEBIAN_MIRROR,SMSLAB_DEBIAN_SECURITY,SMSLAB_DOCKERD_LOG,SMSLAB_DOCKERD_ARGS,DOCKER \
            SMSLAB_IMAGE_CACHE="$CACHE" "$0" "$@"
    fi
    die "run this script as root: apt-get, dockerd and debootstrap need it"
fi

mkdir -p "$CACHE"
log "repository: $REPO"
log "cache: $CACHE"

# --- 1. host packages -------------------------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

POLICY_RC=/usr/sbin/policy-rc.d
remove_policy_rc() { [[ -f $POLICY_RC ]] && grep -q 'smslab build-local-images' "$POLICY_RC" && rm -f "$POLICY_RC"; return 0; }

ensure_packages() {
    local missing=() p
    for p in docker.io docker-compose debootstrap; do installed "$p" || missing+=("$p"); done
    if ! python3 -m pip --version >/dev/null 2>&1; then missing+=(python3-pip); fi
    # debootstrap of bookworm checks signatures with Debian's keyring (not there on Ubuntu, say).
    if [[ ! -s /usr/share/keyrings/debian-archive-keyring.gpg ]]; then missing+=(debian-archive-keyring); fi
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "host packages present: docker.io docker-compose debootstrap (and pip for python3)"
        return
    fi
    local t0; t0=$(date +%s)
    log "installing host packages: ${missing[*]}"
    # Without systemd, docker.io's postinst would start dockerd through /etc/init.d with options we
    # do not control; this script starts it itself (step 2), so forbid service starts meanwhile.
    if [[ ! -d /run/systemd/system && ! -e $POLICY_RC ]]; then
        printf '#!/bin/sh\n# smslab build-local-images: no service starts during apt-get install\nexit 101\n' >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        trap remove_policy_rc EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update -qq
    run apt-get install -y -qq --no-install-recommends "${missing[@]}" ca-certificates xz-utils >/dev/null
    remove_policy_rc
    log "host packages installed in $(elapsed "$t0")"
}

# Compose v2 (`docker compose`) beside Debian's docker-compose 1.29: bookworm has no v2, so the
# plugin's static binary comes from Debian trixie's docker-compose package (cached).
COMPOSE_V2_DEB="docker-compose_2.26.1-4_amd64.deb"
ensure_compose_v2() {
    if "$DOCKER" compose version >/dev/null 2>&1; then
        log "docker compose v2 present: $("$DOCKER" compose version 2>/dev/null | head -1)"
        return 0
    fi
    if [[ $(dpkg --print-architecture 2>/dev/null) != amd64 ]]; then
        warn "no docker compose v2 and no plugin package for $(dpkg --print-architecture): docker-compose 1.29 only"
        return 0
    fi
    local deb="$CACHE/$COMPOSE_V2_DEB" dir
    if [[ ! -s $deb ]]; then
        run curl -fsSL -o "$deb.part" "$MIRROR/pool/main/d/docker-compose/$COMPOSE_V2_DEB" \
            || die "cannot download $COMPOSE_V2_DEB from $MIRROR"
        mv "$deb.part" "$deb"
    fi
    dir=$(mktemp -d)
    dpkg-deb -x "$deb" "$dir"
    mkdir -p /usr/local/lib/docker/cli-plugins
    install -m 0755 "$dir/usr/libexec/docker/cli-plugins/docker-compose" /usr/local/lib/docker/cli-plugins/docker-compose
    rm -rf "$dir"
    "$DOCKER" compose version >/dev/null 2>&1 || die "docker compose v2 does not run after installing the plugin"
    log "installed docker compose v2: $("$DOCKER" compose version | head -1)"
}

# --- 2. the docker engine ---------------------------------------------------------------------
docker_ok() { timeout 20 "$DOCKER" info >/dev/null 2>&1; }

wait_docker() {
    local secs=$1 pid=${2:-} i
    for ((i = 0; i < secs; i++)); do
        docker_ok && return 0
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
        sleep 1
    done
    return 1
}

overlay_works() {
    # overlay2 needs an overlay mount whose upper dir is on the data root's file system.
    local root=/var/lib/docker t ok=1
    mkdir -p "$root"
    t=$(mktemp -d "$root/.smslab-overlay-check.XXXXXX")
    mkdir -p "$t/lower" "$t/upper" "$t/work" "$t/merged"
    if mount -t overlay overlay -o "lowerdir=$t/lower,upperdir=$t/upper,workdir=$t/work" "$t/merged" 2>/dev/null; then
        umount "$t/merged"; ok=0
    fi
    rm -rf "$t"
    return $ok
}

ensure_cgroups() {
    # Docker needs a cgroup hierarchy; mount one when nothing did (no systemd, bare init).
    if [[ -f /sys/fs/cgroup/cgroup.controllers || -d /sys/fs/cgroup/memory || -d /sys/fs/cgroup/unified ]]; then
        return
    fi
    warn "no cgroup hierarchy under /sys/fs/cgroup: mounting cgroup2 there"
    mkdir -p /sys/fs/cgroup
    mount -t cgroup2 none /sys/fs/cgroup || die "cannot mount cgroup2 on /sys/fs/cgroup; dockerd needs cgroups"
}

ensure_engine() {
    if docker_ok; then
        log "docker engine answers: server $("$DOCKER" version -f '{{.Server.Version}}' 2>/dev/null), storage driver $("$DOCKER" info -f '{{.Driver}}' 2>/dev/null)"
        return
    fi
    local t0; t0=$(date +%s)
    if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        log "no engine answers; systemd is running: systemctl start docker"
        systemctl start docker || warn "systemctl start docker failed; starting dockerd by hand"
        if wait_docker 60; then log "docker engine up (systemd) in $(elapsed "$t0")"; return; fi
    fi
    local pidfile=/var/run/docker.pid
    if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        log "dockerd (pid $(cat "$pidfile")) is running but does not answer yet; waiting"
        wait_docker 90 && { log "docker engine answers"; return; }
        die "dockerd (pid $(cat "$pidfile")) runs but 'docker info' fails; see its log (${DOCKERD_LOG})"
    fi
    ensure_cgroups
    local args=()
    if [[ " ${SMSLAB_DOCKERD_ARGS:-} " != *" --storage-driver"* ]]; then
        if overlay_works; then
            args+=(--storage-driver=overlay2)
        else
            warn "an overlay mount fails on /var/lib/docker's file system: falling back to --storage-driver=vfs (slow, large)"
            args+=(--storage-driver=vfs)
        fi
    fi
    if [[ " ${SMSLAB_DOCKERD_ARGS:-} " != *" --iptables"* ]] && ! iptables -t nat -S >/dev/null 2>&1; then
        warn "iptables cannot use the nat table here: starting dockerd with --iptables=false --ip-masq=false" \
             "(published ports still work through docker-proxy; containers get no outbound NAT)"
        args+=(--iptables=false --ip-masq=false)
    fi
    # shellcheck disable=SC2206  # word splitting of the extra arguments is intended
    args+=(${SMSLAB_DOCKERD_ARGS:-})
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    log "no engine answers: starting dockerd ${args[*]} in the background (log: $DOCKERD_LOG)"
    printf '\n==== %s: dockerd %s (started by build-local-images.sh)\n' "$(date -Is)" "${args[*]}" >>"$DOCKERD_LOG"
    setsid nohup dockerd "${args[@]}" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local pid=$!
    if ! wait_docker 90 "$pid"; then
        echo "---- last lines of $DOCKERD_LOG" >&2
        tail -n 25 "$DOCKERD_LOG" >&2 || true
        die "dockerd did not come up (see $DOCKERD_LOG). Try SMSLAB_DOCKERD_ARGS='--iptables=false' or '--storage-driver=vfs'"
    fi
    log "docker engine up in $(elapsed "$t0"): dockerd pid $pid, server $("$DOCKER" version -f '{{.Server.Version}}'), storage driver $("$DOCKER" info -f '{{.Driver}}')"
    log "dockerd keeps running after this script; stop it with: kill \$(cat /var/run/docker.pid)"
}

# --- 3. images --------------------------------------------------------------------------------
have_image() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# An image is built when it is missing, when a rebuild is asked for, or when an image below it
# was just built (so nothing rests on a stale base).
need_build() {  # need_build IMAGE FORCE
    if [[ $2 -eq 1 ]]; then return 0; fi
    ! have_image "$1"
}

BUILD_FLAGS=()
configure_builder() {
    # The Debian engine has no buildx: use the classic builder then (the Dockerfiles work with both).
    if ! "$DOCKER" buildx version >/dev/null 2>&1; then
        export DOCKER_BUILDKIT=0
        log "no buildx plugin: using the classic builder (DOCKER_BUILDKIT=0)"
    fi
    if [[ $REBUILD_ALL -eq 1 ]]; then BUILD_FLAGS+=(--no-cache); fi
}

make_rootfs_tarball() {
    local t0 root; t0=$(date +%s)
    root="$CACHE/rootfs.tmp"
    rm -rf "$root"
    log "debootstrap --variant=minbase $SUITE from $MIRROR (about a minute)"
    if ! debootstrap --variant=minbase --components=main "$SUITE" "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        die "debootstrap failed (full log: $CACHE/debootstrap.log; $root/debootstrap/debootstrap.log)"
    fi
    log "debootstrap done in $(elapsed "$t0"); configuring the root file system for containers"
    cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOF
    # No docs, man pages or translations in any later install (copyright files are kept).
    cat >"$root/etc/dpkg/dpkg.cfg.d/smslab-excludes" <<'EOF'
# smslab images: keep them small
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
    cat >"$root/etc/apt/apt.conf.d/90smslab-container" <<'EOF'
// smslab images: no recommends, no translations, no package caches left behind
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
EOF
    printf '#!/bin/sh\n# containers start no services through invoke-rc.d\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    # Security and point updates, so the base is as current as the mirror.
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    if ! chroot "$root" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get -y -qq upgrade' >>"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        die "apt-get upgrade in the new root file system failed (log: $CACHE/debootstrap.log)"
    fi
    # Strip what debootstrap itself installed and the host traces it copied.
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root/usr/share/man/"* "$root/usr/share/info/"* "$root/usr/share/lintian" "$root/usr/share/linda"
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"* "$root/var/cache/debconf/"*-old \
           "$root/var/log/"* "$root/debootstrap" "$root/tmp/"* "$root/var/tmp/"*
    : >"$root/etc/resolv.conf"
    echo localhost >"$root/etc/hostname"
    : >"$root/etc/machine-id"
    log "packing $ROOTFS_TAR"
    tar --numeric-owner --xattrs -C "$root" -cf - . | gzip -1 >"$ROOTFS_TAR.tmp"
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    rm -rf "$root"
    log "root file system tarball: $(du -h "$ROOTFS_TAR" | cut -f1) in $(elapsed "$t0")"
}

build_debian() {
    if [[ ! -s $ROOTFS_TAR ]]; then
        make_rootfs_tarball
    else
        log "using cached root file system $ROOTFS_TAR ($(du -h "$ROOTFS_TAR" | cut -f1))"
    fi
    local t0; t0=$(date +%s)
    run "$DOCKER" import \
        --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'LABEL org.smslab.image=debian org.opencontainers.image.description="Debian bookworm minbase (debootstrap), for smslab"' \
        --message "debootstrap --variant=minbase $SUITE" \
        "$ROOTFS_TAR" "$IMG_DEBIAN" >/dev/null
    log "$IMG_DEBIAN imported in $(elapsed "$t0")"
}

docker_build() {  # docker_build TAG DOCKERFILE CONTEXT [ARGS...]
    local tag=$1 file=$2 ctx=$3 t0; shift 3
    t0=$(date +%s)
    log "building $tag from ${file#"$REPO"/}"
    if ! "$DOCKER" build "${BUILD_FLAGS[@]}" "$@" -t "$tag" -f "$file" "$ctx"; then
        die "docker build of $tag failed (see above)"
    fi
    log "$tag built in $(elapsed "$t0")"
}

source_hash() {
    # What the site image is made of: the package sources and the Dockerfile.
    (cd "$REPO" && find pyproject.toml README.md Dockerfile emulator broker sites -type f \
        \( -name '*.py' -o -name '*.toml' -o -name '*.md' -o -name '*.typed' -o -name Dockerfile \) \
        -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

build_wheels() {
    # smslab itself: pip wheel from a copy of the sources (no build/ left in the work tree);
    # dependencies: binary wheels for CPython 3.11 on manylinux, the images' interpreter, whatever
    # the host's Python is. They are cached; the set is refetched when pyproject.toml changes.
    local t0 src wheels deps arch stamp want
    t0=$(date +%s)
    src="$CACHE/src"; wheels="$CACHE/wheels"; deps="$wheels/deps"
    rm -rf "$src" "$wheels/smslab"
    mkdir -p "$src" "$wheels/smslab" "$deps"
    (cd "$REPO" && tar --exclude=__pycache__ --exclude='*.pyc' -cf - pyproject.toml README.md emulator broker sites) | tar -C "$src" -xf -
    log "pip wheel --no-deps (smslab) -> $wheels/smslab"
    if ! python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$wheels/smslab" "$src"; then
        die "pip wheel of the smslab package failed"
    fi
    local whl; whl=$(ls "$wheels/smslab"/smslab-*.whl)
    arch=$(uname -m)
    want="$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)-cp311-$arch"
    stamp="$deps/.stamp"
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && ls "$deps"/*.whl >/dev/null 2>&1; then
        log "dependency wheels cached in $deps ($(find "$deps" -name '*.whl' | wc -l) wheels)"
    else
        log "pip download: dependency wheels for cp311 manylinux $arch -> $deps"
        rm -f "$deps"/*.whl "$stamp"
        if ! python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
                --implementation cp --python-version 3.11 --abi cp311 --abi abi3 \
                --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" \
                --platform "manylinux_2_28_$arch" --platform "manylinux_2_34_$arch" \
                --find-links "$wheels/smslab" -d "$deps" "$whl"; then
            die "pip download of smslab's dependencies failed (PyPI reachable?)"
        fi
        rm -f "$deps"/smslab-*.whl
        echo "$want" >"$stamp"
    fi
    # The site image's build context: just the wheels (Dockerfile: COPY . /src, then /src/wheels).
    rm -rf "$CACHE/site-context"
    mkdir -p "$CACHE/site-context/wheels"
    cp "$deps"/*.whl "$wheels/smslab"/*.whl "$CACHE/site-context/wheels/"
    log "wheels ready in $(elapsed "$t0"): $(find "$CACHE/site-context/wheels" -name '*.whl' -printf '%f ')"
}

# --- main ---------------------------------------------------------------------------------------
ensure_packages
ensure_engine
ensure_compose_v2
configure_builder

if [[ $REFRESH_CACHE -eq 1 ]]; then
    log "--refresh-cache: dropping $ROOTFS_TAR and $CACHE/wheels"
    rm -rf "$ROOTFS_TAR" "$CACHE/wheels" "$CACHE/src" "$CACHE/site-context"
fi

built_debian=0 built_python=0
if need_build "$IMG_DEBIAN" "$REBUILD_ALL"; then build_debian; built_debian=1
else log "$IMG_DEBIAN exists: kept"; fi

if need_build "$IMG_PYTHON" $(( REBUILD_ALL | built_debian )); then
    docker_build "$IMG_PYTHON" "$REPO/docker/python/Dockerfile" "$REPO/docker/python" \
        --network host --build-arg "DEBIAN_IMAGE=$IMG_DEBIAN"
    built_python=1
else log "$IMG_PYTHON exists: kept"; fi

if need_build "$IMG_RABBITMQ" $(( REBUILD_ALL | built_debian )); then
    docker_build "$IMG_RABBITMQ" "$REPO/docker/rabbitmq/Dockerfile" "$REPO/docker/rabbitmq" \
        --network host --build-arg "DEBIAN_IMAGE=$IMG_DEBIAN"
else log "$IMG_RABBITMQ exists: kept"; fi

hash=$(source_hash)
old_hash=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.smslab.source-sha256"}}' "$IMG_SITE" 2>/dev/null || true)
stale=0
if have_image "$IMG_SITE" && [[ $old_hash != "$hash" ]]; then
    log "$IMG_SITE was built from other sources than the work tree's: rebuilding it"
    stale=1
fi
if need_build "$IMG_SITE" $(( REBUILD_ALL | REBUILD_SITE | built_python | stale )); then
    build_wheels
    # No --network: every wheel is in the context, pip runs with --no-index.
    docker_build "$IMG_SITE" "$REPO/Dockerfile" "$CACHE/site-context" \
        --build-arg "PYTHON_IMAGE=$IMG_PYTHON" --label "org.smslab.source-sha256=$hash"
else
    log "$IMG_SITE exists and matches the work tree: kept"
fi

# Images replaced by a rebuild are left untagged: remove those of ours.
"$DOCKER" image prune -f --filter label=org.smslab.image >/dev/null 2>&1 || true

log "done in $(elapsed "$START_ALL"). Images:"
"$DOCKER" images --filter 'reference=smslab/*' --format 'table {{.Repository}}:{{.Tag}}\t{{.ID}}\t{{.Size}}\t{{.CreatedSince}}'
