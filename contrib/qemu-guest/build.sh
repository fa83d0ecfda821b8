#!/usr/bin/env bash
# Build livemig's QEMU test guest: a Debian bookworm kernel plus an initramfs
# holding busybox and our own memwriter (see README.md beside this file).
#
#   contrib/qemu-guest/build.sh [OUT_DIR]      (default: ~/.cache/livemig/qemu-guest)
#
# Everything comes from Debian packages fetched with `apt-get download` and
# unpacked with `dpkg -x` (nothing is installed on the host), plus memwriter.c
# compiled here.  The result is cached: OUT_DIR/.stamp holds a hash of this
# script, memwriter.c, the package versions and the compiler version, and a
# second run with the same inputs exits at once.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/livemig/qemu-guest}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s.%N)

log() { echo "qemu-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

command -v gcc >/dev/null || die "gcc not found (apt-get install gcc libc6-dev)"
command -v apt-get >/dev/null || die "apt-get not found: this script needs a Debian host"

# --- resolve the package versions (needs apt lists; update them once if empty)
UPDATED=0
apt_update() {
    if [ "$UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq
        UPDATED=1
    fi
}

# linux-image-amd64 is a metapackage depending on the real, versioned
# linux-image-6.1.0-N-amd64 "(= VERSION)"; take name and version from its
# Depends. One apt-cache call for everything (each call costs ~0.7 s, and
# this runs on the cached path too). Prints "KPKG KVER BBVER".
resolve() {
    apt-cache show --no-all-versions linux-image-amd64 busybox-static 2>/dev/null | awk '
        /^Package: / { pkg = $2 }
        pkg == "busybox-static" && /^Version: / { bb = $2 }
        pkg == "linux-image-amd64" && /^Depends: / {
            if (match($0, /linux-image-[0-9][^ ,]*-amd64 \(= [^)]*\)/)) {
                split(substr($0, RSTART, RLENGTH), a, /[ ()=]+/)
                kp = a[1]; kv = a[2]
            }
        }
        END { if (kp != "" && kv != "" && bb != "") print kp, kv, bb }'
}

read -r KPKG KVER BBVER < <(resolve) || true
if [ -z "${BBVER:-}" ]; then
    apt_update
    read -r KPKG KVER BBVER < <(resolve) || true
fi
[ -n "${BBVER:-}" ] || die "cannot resolve linux-image-amd64's kernel package and busybox-static (apt lists?)"

STAMP="$(
    {
        sha256sum "$HERE/build.sh" "$HERE/memwriter.c" | awk '{ print $1 }'
        echo "$KPKG=$KVER busybox-static=$BBVER gcc=$(gcc -dumpfullversion)"
    } | sha256sum | awk '{ print $1 }'
)"

print_outputs() {
    echo "$OUT/vmlinuz"
    echo "$OUT/initramfs.cpio.gz"
    echo "$OUT/memwriter"
}

if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$STAMP" ] \
    && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initramfs.cpio.gz" ]; then
    log "up to date ($KPKG $KVER, busybox-static $BBVER)"
    print_outputs
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/debs"
chmod 755 "$TMP"
# apt-get download drops privileges to _apt; let that user write here, or apt
# warns and downloads unsandboxed.
chown _apt "$TMP/debs" 2>/dev/null || true

# --- fetch (update the lists and retry once if the cached lists are stale)
fetch() {
    (cd "$TMP/debs" && apt-get download -q "$KPKG=$KVER" "busybox-static=$BBVER") >&2
}
log "apt-get download $KPKG=$KVER busybox-static=$BBVER"
if ! fetch; then
    apt_update
    read -r KPKG KVER BBVER < <(resolve) || true
    fetch || die "apt-get download failed"
fi

# --- unpack, no install
dpkg -x "$TMP"/debs/linux-image-*.deb "$TMP/kernel"
dpkg -x "$TMP"/debs/busybox-static_*.deb "$TMP/bb"
VMLINUZ="$(ls "$TMP"/kernel/boot/vmlinuz-* | head -n1)"
[ -f "$VMLINUZ" ] || die "no vmlinuz-* in $KPKG"
BB="$TMP/bb/bin/busybox"
[ -x "$BB" ] || die "no bin/busybox in busybox-static"

# --- our workload, static: glibc's libc.a (libc6-dev) links fine with pthreads
log "gcc -O2 -static memwriter.c"
gcc -O2 -static -pthread -s -Wall -o "$TMP/memwriter" "$HERE/memwriter.c"

# --- initramfs root
R="$TMP/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp}
cp "$BB" "$R/bin/busybox"
# One symlink per applet at busybox's own path for it (sh, mount, insmod, ...).
"$BB" --list-full | while read -r app; do
    [ "$app" = bin/busybox ] && continue
    mkdir -p "$R/$(dirname "$app")"
    ln -sf /bin/busybox "$R/$app"
done
cp "$TMP/memwriter" "$R/bin/memwriter"

# --- the virtio disk driver: Debian builds virtio_blk (and virtio, virtio_ring,
# virtio_pci) as modules, so they go in the initramfs, each after the modules
# it depends on (the `depends=` of its .modinfo; the package has no
# modules.dep, depmod writes that at install), for /init to insmod in order.
MODDIR="$(ls -d "$TMP"/kernel/lib/modules/*/kernel | head -n1)"
[ -d "$MODDIR" ] || die "no lib/modules/*/kernel in $KPKG"
mkdir -p "$R/lib/modules"
: >"$R/lib/modules/load.order"
add_module() {
    local name="$1" ko deps dep
    grep -qx "$name.ko" "$R/lib/modules/load.order" && return 0
    ko="$(find "$MODDIR" -name "$name.ko" | head -n1)"
    [ -n "$ko" ] || die "module $name.ko not found in $KPKG"
    deps="$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -n1)"
    for dep in ${deps//,/ }; do add_module "$dep"; done
    cp "$ko" "$R/lib/modules/$name.ko"
    echo "$name.ko" >>"$R/lib/modules/load.order"
}
add_module virtio_pci
add_module virtio_blk
# The kernel opens /dev/console for init before /init can mount devtmpfs;
# without the node init would start with no stdio. Needs root (CI is root);
# /init reopens the console after mounting devtmpfs in any case.
mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || log "note: cannot mknod dev/console (not root?)"

cat >"$R/init" <<'EOF'
#!/bin/sh
# livemig QEMU test guest. ttyS0 = kernel console, ttyS1 = memwriter's port.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
# memwriter.shell=1 on the kernel command line: a shell on the console instead.
case " $(cat /proc/cmdline) " in
*" memwriter.shell=1 "*) exec /bin/sh ;;
esac
# A disk for memwriter (memwriter.disk_mib=N): the virtio block driver first.
case " $(cat /proc/cmdline) " in
*" memwriter.disk_mib="*)
    while read -r ko; do insmod "/lib/modules/$ko" || echo "init: insmod $ko failed"; done </lib/modules/load.order ;;
esac
# memwriter reads its memwriter.* settings from /proc/cmdline itself.
exec /bin/memwriter
EOF
chmod 755 "$R/init"

# --- pack: newc cpio, gzip. GNU cpio if present, else busybox's own applet.
if command -v cpio >/dev/null; then
    CPIO=(cpio --quiet -o -H newc -R 0:0)
else
    CPIO=("$BB" cpio -o -H newc)
fi
(cd "$R" && find . -mindepth 1 | LC_ALL=C sort | "${CPIO[@]}") | gzip -9 -n >"$TMP/initramfs.cpio.gz"

# --- install outputs, stamp last so an interrupted build is never "cached"
rm -f "$OUT/.stamp"
cp "$VMLINUZ" "$OUT/vmlinuz"
cp "$TMP/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz"
cp "$TMP/memwriter" "$OUT/memwriter"
echo "$KPKG=$KVER busybox-static=$BBVER" >"$OUT/packages.txt"
echo "$STAMP" >"$OUT/.stamp"

log "built in $(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')s ($KPKG $KVER, busybox-static $BBVER)"
print_outputs
