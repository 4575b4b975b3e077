#!/usr/bin/env python3
"""The VHD section of the scripts/bench.sh report: dynamic VHD LUN against the raw file LUN.

Usage: vhd_table.py RESULTS COMMANDS.txt
RESULTS: results.json or the raw RESULTS.tsv (results.py describes both); this script uses the
v_* keys with TARGET raw or vhd. Issue 7's goal: every workload on the VHD LUN reaches at least
80 % of the raw LUN's throughput.
"""
import sys

from results import load
from table import summary

GOAL = 0.8
# key, label, unit
WORKLOADS = [
    ("v_rr4k", "4 KiB random read QD32 (iscsi-perf)", "IOPS"),
    ("v_sr64k", "64 KiB sequential read QD8 (iscsi-perf)", "MB/s"),
    ("v_sr1m", "1 MiB sequential read QD8 (iscsi-perf)", "MB/s"),
    ("v_w4k", "4 KiB strided write QD32 (qemu-img bench)", "IOPS"),
    ("v_sw64k", "64 KiB sequential write QD8 (qemu-img bench)", "MB/s"),
    ("v_sw1m", "1 MiB sequential write QD8 (qemu-img bench)", "MB/s"),
]


def main():
    res, commands = sys.argv[1:3]
    vals, cpu, _ = load(res)
    print("**VHD LUN vs raw file LUN** (issue 7: reads and writes of allocated blocks on a dynamic "
          "VHD reach at least 80 % of the raw file's throughput); medians (min–max), the same "
          "ironlun process serving both.")
    print()
    print("| workload | unit | raw median (min–max) | VHD median (min–max) | VHD/raw | goal | met? "
          "| CPU µs/op raw | CPU µs/op VHD |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, label, unit in WORKLOADS:
        mr, sr = summary(vals[(key, "raw")])
        mv, sv = summary(vals[(key, "vhd")])
        if mr is None or mv is None or mr == 0:
            ratio, met = "n/a", "n/a"
        else:
            ratio = f"{100 * mv / mr:.0f} %"
            met = "yes" if mv / mr >= GOAL else "**no**"
        _, cr = summary(cpu[(key, "raw")])
        _, cv = summary(cpu[(key, "vhd")])
        print(f"| {label} | {unit} | {sr} | {sv} | {ratio} | ≥ {100 * GOAL:.0f} % | {met} | {cr} | {cv} |")
    print()
    print(open(commands, encoding="utf-8").read().rstrip("\n"))


if __name__ == "__main__":
    main()
