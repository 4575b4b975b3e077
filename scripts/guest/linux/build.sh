#!/usr/bin/env bash
# Build the Linux initiator guest of test tier 7: Debian bookworm's generic kernel and a Debian
# root file system (packages listed in ./packages, built with mmdebstrap) that the kernel unpacks
# as its initramfs, plus ./init as /init.
#   usage: scripts/guest/linux/build.sh [OUTDIR]          (default: target/linux-guest)
# Produces OUTDIR/vmlinuz and OUTDIR/initrd (uncompressed cpio: the rootfs, then a gzipped cpio
# holding /init, appended at a 4-byte boundary). Prints "kernel PATH" and "initrd PATH" last.
#
# Cached: the rootfs is rebuilt only when ./packages, this script, tar2cpio.py or
# prune-modules.sh change (their hash names OUTDIR/rootfs-<hash>.cpio); ./init only re-appends. The .debs are kept in
# OUTDIR/debs, so a rebuild downloads only what changed. Needs root (mmdebstrap --mode=root)
# or unprivileged user namespaces with subuids (--mode=unshare), and a Debian mirror: the first
# one in the machine's apt sources, else deb.debian.org. Nothing else is fetched.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../../target/linux-guest}
mkdir -p "$out/debs"
out=$(cd "$out" && pwd)
die() { echo "build-linux-guest: $*" >&2; exit 1; }
for t in mmdebstrap python3 gzip sha256sum; do
  command -v "$t" >/dev/null || die "$t is required (scripts/install-deps.sh installs it)"
done

key=$(cat "$here/packages" "$here/build.sh" "$here/tar2cpio.py" "$here/prune-modules.sh" | sha256sum | cut -c1-16)
rootfs="$out/rootfs-$key.cpio"
kernel="$out/vmlinuz-$key"

# The modules the guest loads (with their dependencies); every other module is deleted.
modules="iscsi_tcp scsi_dh_alua scsi_dh_rdac scsi_dh_emc dm_multipath dm_round_robin dm_service_time
dm_queue_length sd_mod sg virtio_net virtio_pci 9p 9pnet_virtio xfs ext4 crc32c_generic crc32c-intel
softdog loop"

if [ ! -f "$rootfs" ] || [ ! -f "$kernel" ]; then
  t0=$(date +%s)
  mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1 || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  mode=root
  [ "$(id -u)" = 0 ] || mode=unshare
  pkgs=$(sed 's/#.*//' "$here/packages" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
  work=$(mktemp -d "$out/build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  echo "build-linux-guest: mmdebstrap bookworm from $mirror ($mode mode), cache key $key"
  # --skip=download/empty and the sync-in/out hooks keep the .debs in OUTDIR/debs.
  mmdebstrap --mode="$mode" --variant=essential --include="$pkgs" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/dri/*' \
    --skip=download/empty --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in '$out/debs' /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives '$out/debs'" \
    --customize-hook='chroot "$1" sh -c "cp /boot/vmlinuz-* /tmp/vmlinuz"' \
    --customize-hook="copy-out /tmp/vmlinuz '$work'" \
    --customize-hook='rm -rf "$1"/tmp/vmlinuz "$1"/boot/* "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    --customize-hook="copy-in '$here/prune-modules.sh' /tmp" \
    --customize-hook="chroot \"\$1\" sh /tmp/prune-modules.sh $(echo $modules)" \
    bookworm "$work/rootfs.tar" "$mirror" || die "mmdebstrap failed"
  python3 "$here/tar2cpio.py" "$work/rootfs.tar" "$rootfs.tmp"
  mv "$work/vmlinuz" "$kernel"
  mv "$rootfs.tmp" "$rootfs"
  # Older cache generations go.
  for f in "$out"/rootfs-*.cpio "$out"/vmlinuz-*; do
    case $f in "$rootfs"|"$kernel") ;; *) rm -f "$f" ;; esac
  done
  echo "build-linux-guest: rootfs $(du -m "$rootfs" | cut -f1) MiB built in $(( $(date +%s) - t0 )) s"
fi

# /init (and the agent it runs), as a small gzipped cpio appended at a 4-byte boundary.
stamp=$( (echo "$key"; cat "$here/init") | sha256sum | cut -c1-16)
if [ ! -f "$out/initrd" ] || [ "$(cat "$out/stamp" 2>/dev/null)" != "$stamp" ]; then
  tiny=$(mktemp -d)
  install -m 755 "$here/init" "$tiny/init"
  python3 "$here/../mkcpio.py" "$tiny" "$out/init.cpio.gz"
  rm -rf "$tiny"
  cp "$rootfs" "$out/initrd.tmp"
  size=$(stat -c %s "$out/initrd.tmp")
  pad=$(( (4 - size % 4) % 4 ))
  head -c "$pad" /dev/zero >>"$out/initrd.tmp"
  cat "$out/init.cpio.gz" >>"$out/initrd.tmp"
  mv "$out/initrd.tmp" "$out/initrd"
  cp "$kernel" "$out/vmlinuz"
  echo "$stamp" >"$out/stamp"
fi
echo "kernel $out/vmlinuz"
echo "initrd $out/initrd"
