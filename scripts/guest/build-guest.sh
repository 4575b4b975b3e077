#!/usr/bin/env bash
# Build the tiny test guest for the QEMU live-migration test: a Debian cloud kernel and an
# initramfs (busybox-static, the virtio-blk modules, scripts/guest/init), from Debian packages
# fetched with `apt-get download` and unpacked with `dpkg-deb -x`, never installed.
#   usage: scripts/guest/build-guest.sh [OUTDIR]      (default: target/guest)
# Produces OUTDIR/vmlinuz and OUTDIR/initrd.gz. Idempotent: the .debs are cached in OUTDIR/debs
# (offline after the first run) and the outputs are rebuilt only when the inputs changed.
# Prints the two paths on its last two lines: "kernel PATH" and "initrd PATH".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../target/guest}
mkdir -p "$out/debs"
out=$(cd "$out" && pwd)
die() { echo "build-guest: $*" >&2; exit 1; }
for t in apt-get dpkg-deb python3 gzip; do
  command -v "$t" >/dev/null || die "$t is required (Debian host)"
done

# 1. The packages: the versioned kernel linux-image-cloud-amd64 depends on, and busybox-static.
# A kernel already in OUTDIR/debs is used as is (stable and offline; delete it to refresh).
deb_of() { ls "$out/debs/$1"_*.deb 2>/dev/null | head -1; }
kdeb=$(ls "$out"/debs/linux-image-*-cloud-amd64_*.deb 2>/dev/null | head -1 || true)
if [ -n "$kdeb" ]; then
  kpkg=$(basename "$kdeb" | cut -d_ -f1)
else
  kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}' || true)
  [ -n "$kpkg" ] || die "cannot resolve linux-image-cloud-amd64 to a kernel package (apt-get update?)"
fi
for p in "$kpkg" busybox-static; do
  if [ -z "$(deb_of "$p")" ]; then
    echo "build-guest: downloading $p"
    # apt's _apt user may not write to OUTDIR; download in a world-writable scratch dir.
    tmp=$(mktemp -d)
    chmod 777 "$tmp"
    (cd "$tmp" && apt-get download -q "$p" >/dev/null) ||
      { rm -rf "$tmp"; die "apt-get download $p failed (network or apt lists?)"; }
    mv "$tmp"/*.deb "$out/debs/"
    rm -rf "$tmp"
  fi
done
kdeb=$(deb_of "$kpkg")
bdeb=$(deb_of busybox-static)

# 2. Up to date? The stamp records the inputs (package files and the scripts of this directory).
stamp=$( (basename "$kdeb"; basename "$bdeb"; cat "$here/init" "$here/mkcpio.py" "$0") | sha256sum | cut -c1-16)
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "build-guest: up to date in $out"
  echo "kernel $out/vmlinuz"
  echo "initrd $out/initrd.gz"
  exit 0
fi

# 3. Unpack and assemble the initramfs tree.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/kernel"
dpkg-deb -x "$bdeb" "$work/busybox"
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* 2>/dev/null | head -1)
[ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in $(basename "$kdeb")"
kver=${vmlinuz##*/vmlinuz-}
config="$work/kernel/boot/config-$kver"
moddir="$work/kernel/lib/modules/$kver/kernel"
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init" "$root/bin/busybox"

# The virtio modules, in load order; each is either a module (copied, with its dependencies
# checked against the ones before it) or built in (CONFIG_...=y, nothing to load).
loaded=" "
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  ko=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -1)
  if [ -z "$ko" ]; then
    sym=$(case $m in
      virtio_ring|virtio) echo CONFIG_VIRTIO ;;
      virtio_pci_modern_dev) echo CONFIG_VIRTIO_PCI_LIB ;;
      virtio_pci_legacy_dev) echo CONFIG_VIRTIO_PCI_LIB_LEGACY ;;
      virtio_pci) echo CONFIG_VIRTIO_PCI ;;
      virtio_blk) echo CONFIG_VIRTIO_BLK ;;
    esac)
    grep -q "^$sym=y" "$config" || die "$m is neither a module nor built in ($sym) in $kver"
    echo "build-guest: $m built in"
    loaded="$loaded$m "
    continue
  fi
  case $ko in
    *.ko) ;;
    *) die "$ko is compressed; busybox insmod needs a plain .ko" ;;
  esac
  deps=$(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
  for d in $deps; do
    case $loaded in *" $d "*) ;; *) die "$m needs $d, which is not loaded before it" ;; esac
  done
  cp "$ko" "$root/lib/modules/$m.ko"
  echo "build-guest: $m module${deps:+ (after $deps)}"
  loaded="$loaded$m "
done

# 4. Outputs, replaced atomically.
python3 "$here/mkcpio.py" "$root" "$out/initrd.gz"
cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp" >"$out/stamp"
echo "build-guest: built kernel $kver and initrd ($(du -k "$out/initrd.gz" | cut -f1) KiB) in $out"
echo "kernel $out/vmlinuz"
echo "initrd $out/initrd.gz"
