#!/usr/bin/env bash
# Runs the test suite (or its `aarch64` marker subset) on arm64 under qemu-user emulation, in a cached Debian root.
#   bench/aarch64.sh            the marked subset (what differs on another CPU; see docs/aarch64.md)
#   bench/aarch64.sh --all      the whole suite
#   bench/aarch64.sh -- ARGS    pytest ARGS instead
# Needs root (binfmt_misc, chroot) and Debian's package mirror. The root lives in $AARCH64_ROOT
# (default ~/.cache/edgellm/aarch64-root); delete it to rebuild. Output: $AARCH64_ROOT/last-run.log.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${AARCH64_ROOT:-$HOME/.cache/edgellm/aarch64-root}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The emulated CPU: Neoverse N1 (Graviton2, Ampere Altra; NEON and dot-product int8, as on Jetson Orin's
# Cortex-A78AE). QEMU_CPU=max adds i8mm, SVE and the rest that qemu knows.
QEMU_CPU=${QEMU_CPU:-neoverse-n1}
PYTEST_ARGS=(-m aarch64)
case "${1:-}" in
    --all) PYTEST_ARGS=() ;;
    --) shift; PYTEST_ARGS=("$@") ;;
    "") ;;
    *) echo "usage: $0 [--all | -- PYTEST_ARGS...]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "$0: run as root (binfmt_misc and chroot need it)" >&2; exit 2; }

step() { echo "== $(date -u +%H:%M:%S) $*"; }

# 1. The emulator, registered with the kernel so that arm64 programs run transparently.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    step "installing qemu-user-static and debootstrap"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        qemu-user-static debootstrap binfmt-support
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
    || update-binfmts --import qemu-aarch64
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "$0: could not register qemu-aarch64 with binfmt_misc" >&2; exit 1; }

# 2. A Debian arm64 root with Python (cached: built once).
if [ ! -e "$ROOT/.edgellm-root-ready" ]; then
    step "debootstrap arm64 bookworm into $ROOT"
    rm -rf "$ROOT" && mkdir -p "$ROOT"
    debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-dev,gcc,g++,ca-certificates \
        bookworm "$ROOT" "$MIRROR"
    touch "$ROOT/.edgellm-root-ready"
fi

# 3. The project inside it, installed the way the README says (a venv inside the clone).
mounts=()
cleanup() { for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
bind() { mkdir -p "$2"; mountpoint -q "$2" || { mount --bind "$1" "$2"; mounts=("$2" "${mounts[@]}"); }; }
bind /proc "$ROOT/proc"; bind /sys "$ROOT/sys"; bind /dev "$ROOT/dev"
# qemu 7.2 shows the host's (x86) /proc/cpuinfo to the emulated programs, and ONNX Runtime's cpuinfo library
# crashes parsing it as arm64: give them an arm64 one for the emulated core (its features come from qemu's HWCAP).
cpuinfo=$ROOT/tmp/edgellm-cpuinfo
: > "$cpuinfo"
for n in $(seq 0 $(( $(nproc) - 1 ))); do
    printf 'processor\t: %d\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$n" >> "$cpuinfo"
done
mount --bind "$cpuinfo" "$ROOT/proc/cpuinfo"; mounts=("$ROOT/proc/cpuinfo" "${mounts[@]}")
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's CA bundle, so that pip inside the root trusts what the host trusts (e.g. an egress proxy's CA).
HOST_CA=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
cp "$HOST_CA" "$ROOT/etc/ssl/certs/host-ca-bundle.crt"
step "copying the project (tracked files) into $ROOT/edgellm"
rm -rf "$ROOT/edgellm.new" && mkdir -p "$ROOT/edgellm.new"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$ROOT/edgellm.new"
# Keep the venv and the downloaded demo model between runs.
[ -d "$ROOT/edgellm/.venv" ] && mv "$ROOT/edgellm/.venv" "$ROOT/edgellm.new/.venv"
[ -d "$ROOT/edgellm/.cache" ] && mv "$ROOT/edgellm/.cache" "$ROOT/edgellm.new/.cache"
rm -rf "$ROOT/edgellm" && mv "$ROOT/edgellm.new" "$ROOT/edgellm"

run_in_root() { chroot "$ROOT" /usr/bin/env -i QEMU_CPU="$QEMU_CPU" HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca-bundle.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/host-ca-bundle.crt ${PIP_INDEX_URL:+PIP_INDEX_URL=$PIP_INDEX_URL} \
    ${https_proxy:+https_proxy=$https_proxy} ${HTTPS_PROXY:+HTTPS_PROXY=$HTTPS_PROXY} /bin/bash -c "$1"; }
step "pip install -e '.[test]' inside the arm64 root"
run_in_root "cd /edgellm && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q -e '.[test]'"

step "CPU as ONNX Runtime sees it under emulation"
run_in_root "cd /edgellm && .venv/bin/python bench/aarch64_cpu.py"

step "pytest ${PYTEST_ARGS[*]:-(whole suite)}"
start=$(date +%s)
set +e
# Emulation runs 10-50x slower: the per-test time limit (pyproject: 600 s) grows to match.
run_in_root "cd /edgellm && .venv/bin/python -m pytest -p no:cacheprovider --timeout 5400 ${PYTEST_ARGS[*]:-}" 2>&1 | tee "$ROOT/last-run.log"
rc=${PIPESTATUS[0]}
set -e
step "pytest exited $rc after $(( $(date +%s) - start )) s (log: $ROOT/last-run.log)"
exit "$rc"
