#!/usr/bin/env bash
# Install what the test tiers and the benchmark need, when missing (idempotent).
#   libiscsi-bin      iscsi-test-cu, iscsi-ls, iscsi-inq, iscsi-readcapacity16, iscsi-perf
#   qemu-block-extra  qemu-img's iscsi:// driver; must be exactly the qemu-utils version. When
#                     qemu-utils comes from a backports suite, that suite is added, with the mirror
#                     taken from the machine's own apt sources (DESIGN.md §5).
#   tgt, iperf3       the peer target and the loopback ceiling for scripts/bench.sh
#   qemu-system-x86   the live-migration test (initiator-tests/tests/qemu_migration.rs); pinned to
#                     the qemu-utils version (same suite), so both use qemu-block-extra's iSCSI driver
#   python3-libvhdi   an independent VHD reader (libvhdi, with parent support) for the
#                     differencing-chain tests: qemu-img neither creates nor follows VHD parents
#   mmdebstrap        builds the tier-7 Linux guest's root file system from Debian packages
#                     (scripts/guest/linux/build.sh; qemu-system-x86 boots it)
#   util-linux        losetup, for the block-device backstore test on a loop device
#   groff-base        groff, to render the generated man pages with warnings on (crates/ironlun/tests/cli_docs.rs)
#   systemd           systemd-analyze verify, for conf/ironlun.service (crates/ironlun/tests/systemd.rs)
#   prometheus        only for promtool (`promtool check metrics` in crates/ironlun/tests/metrics.rs);
#                     installed without recommends and with service starts denied (policy-rc.d), and
#                     its service disabled afterwards, so no prometheus server is left running
#   etcd-server, etcd-client
#                     etcd and etcdctl 3.4 for the cluster tests (crates/ironlun/tests/etcd.rs starts
#                     its own three members on loopback); installed like prometheus: no service
#                     start, and its service disabled afterwards
#   ceph-mon, ceph-osd, ceph-common, librbd-dev
#                     Ceph 16 for the RBD backstore's tests (crates/backstore/tests/rbd.rs and
#                     initiator-tests/tests/rbd*.rs start their own monitor and memstore OSD on
#                     loopback; the daemon dlopens librbd.so.1 and librados.so.2); installed like
#                     etcd: no service start, and the ceph targets and ceph-crash disabled afterwards
#   libxml2-utils     xmllint, to check the OCF agent's meta-data (initiator-tests/tests/ocf_agent.rs)
#   resource-agents   ocf-tester and ocf-shellfuncs for conf/pacemaker/ironlun-lun (ocf_agent.rs);
#                     installed like etcd (its dependency cluster-glue ships logd.service)
set -euo pipefail
[ "$(id -u)" = 0 ] || SUDO=sudo
SUDO=${SUDO:-}

need=()
command -v iscsi-test-cu >/dev/null || need+=(libiscsi-bin)
command -v tgtd >/dev/null || need+=(tgt)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v qemu-img >/dev/null || need+=(qemu-utils)
/usr/bin/python3 -c 'import pyvhdi' 2>/dev/null || need+=(python3-libvhdi)
command -v losetup >/dev/null || need+=(util-linux)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v groff >/dev/null || need+=(groff-base)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v xmllint >/dev/null || need+=(libxml2-utils)

updated=0
apt_update() { if [ $updated = 0 ]; then $SUDO apt-get update -qq; updated=1; fi; }

if [ ${#need[@]} -gt 0 ]; then
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# qemu-block-extra, pinned to the installed qemu-utils version.
qver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
bver=$(dpkg-query -W -f='${Version}' qemu-block-extra 2>/dev/null || true)
if [ -n "$qver" ] && [ "$qver" != "$bver" ]; then
  case "$qver" in
    *bpo*)
      codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
      if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror=$(grep -rhs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
        [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1)
        echo "deb $mirror ${codename}-backports main" | $SUDO tee /etc/apt/sources.list.d/ironlun-backports.list >/dev/null
        updated=0
      fi ;;
  esac
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "qemu-block-extra=$qver" >/dev/null
fi

# qemu-system-x86, pinned to the qemu-utils version (taken from the suite that has it, e.g. backports;
# the suite was added above when qemu-utils is a backport). Its iSCSI driver is qemu-block-extra's.
qver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
sver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
if [ -n "$qver" ] && [ "$qver" != "$sver" ]; then
  apt_update
  suite=()
  case "$qver" in
    *bpo*) suite=(-t "$(. /etc/os-release && echo "$VERSION_CODENAME")-backports") ;;
  esac
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${suite[@]}" \
    "qemu-system-x86=$qver" "qemu-system-common=$qver" "qemu-system-data=$qver" >/dev/null
fi

# Packages that ship a service the tests must not have running: no service start during the
# install (a policy-rc.d that denies starts, unless one is already in place, as in containers),
# and none at boot. $1: the services (space-separated); the rest: the packages.
install_quiet() {
  local service=$1; shift
  apt_update
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  if [ -d /run/systemd/system ]; then
    # shellcheck disable=SC2086 # one word per service
    $SUDO systemctl disable --now $service >/dev/null 2>&1 || true
  fi
}
# prometheus, for promtool only.
command -v promtool >/dev/null || install_quiet prometheus.service prometheus
# etcd: the tests start their own members on loopback.
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  install_quiet etcd.service etcd-server etcd-client
fi
# Ceph: the RBD tests start their own monitor and OSD on loopback.
if ! command -v ceph-mon >/dev/null || ! command -v ceph-osd >/dev/null || ! command -v rbd >/dev/null \
  || [ ! -e /usr/include/rbd/librbd.h ]; then
  install_quiet "ceph.target ceph-mon.target ceph-osd.target ceph-crash.service" \
    ceph-mon ceph-osd ceph-common librbd-dev
fi
# resource-agents, for ocf-tester (in /usr/sbin) and ocf-shellfuncs.
if [ ! -x /usr/sbin/ocf-tester ] || [ ! -e /usr/lib/ocf/lib/heartbeat/ocf-shellfuncs ]; then
  install_quiet logd.service resource-agents
fi

# Every tool the tests call must now exist: a missing one is a failure, never a skip.
for t in iscsi-test-cu iscsi-ls iscsi-inq iscsi-readcapacity16 iscsi-perf qemu-img qemu-system-x86_64 mmdebstrap tgtd tgtadm iperf3 groff systemd-analyze promtool etcd etcdctl ceph-mon ceph-osd ceph monmaptool rbd xmllint; do
  command -v "$t" >/dev/null || { echo "install-deps: $t still missing" >&2; exit 1; }
done
[ -x /usr/sbin/ocf-tester ] || { echo "install-deps: ocf-tester missing (resource-agents)" >&2; exit 1; }
ldconfig -p | grep 'librbd\.so\.1 ' >/dev/null || { echo "install-deps: librbd.so.1 missing (librbd1)" >&2; exit 1; }
qemu-img --help | grep -w iscsi >/dev/null || { echo "install-deps: qemu-img lacks the iscsi driver" >&2; exit 1; }
echo "install-deps: ok (qemu $qver)"
