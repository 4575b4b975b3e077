#!/bin/sh
# Run inside the guest rootfs by build.sh (mmdebstrap customize hook): keep the kernel modules
# named as arguments and their dependencies, delete every other module, run depmod.
set -eu
kver=$(ls /lib/modules)
for m in "$@"; do
  modprobe -S "$kver" --show-depends "$m" || { echo "prune-modules: no module $m in $kver" >&2; exit 1; }
done | awk '/^insmod/ {print $2}' | sort -u >/tmp/keep
find "/lib/modules/$kver/kernel" -name '*.ko*' | sort | comm -23 - /tmp/keep | xargs rm -f
find "/lib/modules/$kver/kernel" -type d -empty -delete
depmod "$kver"
echo "prune-modules: kept $(wc -l </tmp/keep) modules of $kver"
rm /tmp/keep "$0"
