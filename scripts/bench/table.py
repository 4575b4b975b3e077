#!/usr/bin/env python3
"""Turn scripts/bench.sh raw results into the markdown benchmark table.

Usage: table.py RESULTS HEADER.txt COMMANDS.txt
RESULTS: results.json or the raw RESULTS.tsv (results.py describes both); TARGET is il (ironlun,
file LUN), tgt (tgt, file LUN), ram (ironlun, RAM LUN), spdk (SPDK's iSCSI target, file LUN; only
when bench.sh ran with SPDK_DIR) or - (target-independent). Prints the header line, the table,
the ironlun/SPDK table when there are SPDK runs (issue 17's goals) and the command list.
"""
import statistics
import sys

from results import load

# key, label, unit, direction of "better" (hi|lo), goal ratio (None: informational)
WORKLOADS = [
    ("rr4k_qd1", "4 KiB random read QD1, mean latency (iscsi-perf)", "µs", "lo", 0.7),
    ("rr4k_qd32", "4 KiB random read QD32 (iscsi-perf)", "IOPS", "hi", 2.0),
    ("sr1m_qd8", "1 MiB sequential read QD8 (iscsi-perf)", "MB/s", "hi", 2.0),
    ("qw4k_qd32", "4 KiB write QD32 (qemu-img bench)", "IOPS", "hi", 2.0),
    ("qr1m_qd8", "1 MiB read QD8 (qemu-img bench)", "MB/s", "hi", 2.0),
    ("qw1m_qd8", "1 MiB write QD8 (qemu-img bench)", "MB/s", "hi", 2.0),
    ("sess1", "4 KiB random read, 1 session × QD32 (iscsi-perf)", "IOPS", "hi", None),
    ("sess4", "4 KiB random read, 4 sessions × QD8 (iscsi-perf)", "IOPS", "hi", None),
    ("sess16", "4 KiB random read, 16 sessions × QD2 (iscsi-perf)", "IOPS", "hi", None),
]
CPU_GOAL_KEYS = {"rr4k_qd1", "rr4k_qd32", "qw4k_qd32", "sess1", "sess4", "sess16"}  # 4 KiB ops
# Issue 17's goals against SPDK (ironlun/SPDK): ≥ 1.0× throughput everywhere, ≥ 1.2× on 1 MiB
# write QD8, QD1 latency ≤ 1.0×; target CPU per 4 KiB op ≤ 1.0×.
SPDK_GOALS = {"qw1m_qd8": 1.2, "rr4k_qd1": 1.0}


def per_core(cpu_us):
    """Operations per second of target CPU time, from CPU µs per operation."""
    return None if cpu_us is None or cpu_us <= 0 else 1e6 / cpu_us


def spdk_rows(vals, cpu):
    """The ironlun/SPDK rows: throughput or latency, CPU per op, IOPS per target core."""
    rows = []
    for key, label, unit, better, _ in WORKLOADS:
        if not vals[(key, "spdk")]:
            continue
        mi, si = summary(vals[(key, "il")])
        ms, ss = summary(vals[(key, "spdk")])
        r, g, met = ratio_row(mi, ms, better, SPDK_GOALS.get(key, 1.0))
        rows.append((label, unit, si, ss, r, g, met))
    for key, label, unit, better, _ in WORKLOADS:
        if not cpu[(key, "spdk")]:
            continue
        mi, si = summary(cpu[(key, "il")])
        ms, ss = summary(cpu[(key, "spdk")])
        r, g, met = ratio_row(mi, ms, "lo", 1.0 if key in CPU_GOAL_KEYS else None)
        rows.append((f"target CPU per op: {label.split(' (')[0].replace(', mean latency', '')}", "µs/op", si, ss, r, g, met))
    return rows


def per_core_rows(cpu, targets):
    """IOPS per target core of the 4 KiB workloads, for each target that ran them."""
    rows = []
    for key, label, unit, better, _ in WORKLOADS:
        if key not in CPU_GOAL_KEYS:
            continue
        cells = []
        for t in targets:
            m, _ = summary([per_core(c) for c in cpu[(key, t)]])
            cells.append(fmt(m))
        rows.append((f"IOPS per target core: {label.split(' (')[0].replace(', mean latency', '')}", "op/s", *cells))
    return rows


def fmt(v):
    if v is None:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def summary(vals):
    """Median and min–max, or n/a."""
    v = [x for x in vals if x is not None]
    if not v:
        return None, "n/a"
    m = statistics.median(v)
    if len(v) == 1:
        return m, fmt(m)
    return m, f"{fmt(m)} ({fmt(min(v))}–{fmt(max(v))})"


def ratio_row(a, b, better, goal):
    """Ratio a/b, the goal text and whether it is met."""
    if a is None or b is None or b == 0:
        return "n/a", ("—" if goal is None else ("≥" if better == "hi" else "≤") + f" {goal:.1f}×"), "n/a" if goal else ""
    r = a / b
    if goal is None:
        return f"{r:.2f}×", "—", ""
    met = r >= goal if better == "hi" else r <= goal
    return f"{r:.2f}×", ("≥ " if better == "hi" else "≤ ") + f"{goal:.1f}×", "yes" if met else "**no**"


def main():
    res, header, commands = sys.argv[1:4]
    vals, cpu, _ = load(res)

    rows = []
    for key, label, unit, better, goal in WORKLOADS:
        mi, si = summary(vals[(key, "il")])
        mt, st = summary(vals[(key, "tgt")])
        r, g, met = ratio_row(mi, mt, better, goal)
        rows.append((label, unit, si, st, r, g, met))
    # 1 MiB read against the loopback ceiling
    mip, sip = summary(vals[("iperf", "-")])
    rows.append(("iperf3 loopback ceiling (1 stream, 127.0.0.1)", "MB/s", sip, "—", "—", "—", ""))
    for key, label in (("sr1m_qd8", "iscsi-perf"), ("qr1m_qd8", "qemu-img")):
        mi, _ = summary(vals[(key, "il")])
        mt, _ = summary(vals[(key, "tgt")])
        pi = 100 * mi / mip if mi is not None and mip else None
        pt = 100 * mt / mip if mt is not None and mip else None
        met = "" if pi is None else ("yes" if pi >= 50 else "**no**")
        rows.append((f"1 MiB read QD8 ({label}) as % of iperf3", "%", fmt(pi), fmt(pt), "—", "ironlun ≥ 50%", met))
    # target CPU per operation
    for key, label, unit, better, goal in WORKLOADS:
        mi, si = summary(cpu[(key, "il")])
        mt, st = summary(cpu[(key, "tgt")])
        cg = 0.5 if key in CPU_GOAL_KEYS else None
        r, g, met = ratio_row(mi, mt, "lo", cg)
        rows.append((f"target CPU per op: {label.split(' (')[0].replace(', mean latency', '')}", "µs/op", si, st, r, g, met))
    # RAM backstore: ironlun's protocol-only ceiling, against tgt on its file LUN
    for key, label, unit, better, goal in WORKLOADS:
        if not vals[(key, "ram")]:
            continue
        mr, sr = summary(vals[(key, "ram")])
        mt, st = summary(vals[(key, "tgt")])
        r, _, _ = ratio_row(mr, mt, better, None)
        rows.append((f"ironlun RAM LUN (ceiling): {label}", unit, sr, st, r, "—", ""))
    # memory
    for key, label in (("rss0", "RSS, no session"), ("rss64", "RSS with 64 idle sessions")):
        _, si = summary(vals[(key, "il")])
        _, st = summary(vals[(key, "tgt")])
        mi, _ = summary(vals[(key, "il")])
        met = "" if key != "rss64" or mi is None else ("yes" if mi <= 64 else "**no**")
        rows.append((label, "MiB", si, st, "—", "ironlun ≤ 64 MiB" if key == "rss64" else "—", met))
    if vals[("soak", "il")]:
        g, _ = summary(vals[("soak", "il")])
        minutes = vals[("soak_minutes", "-")][0] if vals[("soak_minutes", "-")] else None
        info = "?" if minutes is None else f"{minutes:g}"
        met = "" if g is None else ("yes" if g <= 2 else "**no**")
        rows.append((f"RSS growth over a {info}-minute QD32 run (last − first sample)", "MiB", fmt(g), "—", "—",
                     "no growth (≤ 2 MiB)", met))
    else:
        rows.append(("RSS growth over a QD32 soak run", "MiB", "not run (--soak MINUTES)", "—", "—",
                     "no growth (≤ 2 MiB)", ""))

    print(open(header, encoding="utf-8").read().rstrip("\n"))
    print()
    print("| workload | unit | ironlun median (min–max) | tgt median (min–max) | ironlun/tgt | goal | met? |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    targets = ["il", "tgt"] + (["spdk"] if any(k[1] == "spdk" for k in list(vals)) else [])
    names = {"il": "ironlun", "tgt": "tgt", "spdk": "SPDK"}
    print()
    print("IOPS per target core (10^6 ÷ target CPU µs per op; SPDK's counts its spinning reactor):")
    print()
    print("| workload | unit | " + " | ".join(names[t] for t in targets) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in targets) + " |")
    for row in per_core_rows(cpu, targets):
        print("| " + " | ".join(row) + " |")
    if "spdk" in targets:
        print()
        print("ironlun against SPDK's iSCSI target (issue 17's goals):")
        print()
        print("| workload | unit | ironlun median (min–max) | SPDK median (min–max) | ironlun/SPDK | goal | met? |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for row in spdk_rows(vals, cpu):
            print("| " + " | ".join(row) + " |")
    print()
    print(open(commands, encoding="utf-8").read().rstrip("\n"))


if __name__ == "__main__":
    main()
