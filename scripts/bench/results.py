#!/usr/bin/env python3
"""The machine-readable results of one scripts/bench.sh run, read by every report renderer.

Usage: results.py RESULTS.tsv --date D --commit C --cores N --reps N --secs N [--quick]
                  [--vhd-only] [--binary PATH] > results.json

RESULTS.tsv is what bench.sh appends while it runs, one measurement a line:
KEY <tab> TARGET <tab> VALUE [<tab> CPU_US_PER_OP]; TARGET is il (ironlun, file LUN), tgt (tgt,
file LUN), ram (ironlun, RAM LUN), spdk (SPDK's iSCSI target, file LUN), raw / vhd (ironlun's
VHD section) or - (target-independent);
"nan" marks a failed run. The JSON document is {"meta": {...}, "runs": [{"key", "target",
"value", "cpu_us_per_op"}, ...]} in the same order; a failed measurement is null and
cpu_us_per_op is absent where the line has no CPU field (RSS, iperf3, soak). load() reads
either form, so table.py, vhd_table.py and chart.py share one parser.
"""
import argparse
import json
import math
import sys
from collections import defaultdict


def num(s):
    """A finite float from a TSV field or JSON value, else None."""
    if s is None:
        return None
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def parse_tsv(text):
    """The runs of a RESULTS.tsv text, in order; lines with fewer than three fields are skipped."""
    runs = []
    for line in text.splitlines():
        f = line.split("\t")
        if len(f) < 3:
            continue
        run = {"key": f[0], "target": f[1], "value": num(f[2])}
        if len(f) >= 4:
            run["cpu_us_per_op"] = num(f[3])
        runs.append(run)
    return runs


def load(path):
    """(values, cpu, meta) of a results file, JSON or TSV: values and cpu map (KEY, TARGET) to the
    list of that pair's measurements in run order (None for a failed run); meta is {} for TSV."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        doc = json.loads(text)
        runs, meta = doc.get("runs", []), doc.get("meta", {})
    else:
        runs, meta = parse_tsv(text), {}
    vals = defaultdict(list)
    cpu = defaultdict(list)
    for r in runs:
        k = (r["key"], r["target"])
        vals[k].append(num(r.get("value")))
        if "cpu_us_per_op" in r:
            cpu[k].append(num(r["cpu_us_per_op"]))
    return vals, cpu, meta


def dumps(meta, runs):
    """The JSON document, one run a line (diffable, still one json.loads)."""
    lines = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in runs)
    return f'{{"meta": {json.dumps(meta, ensure_ascii=False)},\n "runs": [\n{lines}\n ]}}\n'


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tsv")
    p.add_argument("--date", required=True, help="UTC date and time of the run")
    p.add_argument("--commit", required=True)
    p.add_argument("--cores", type=int, required=True)
    p.add_argument("--reps", type=int, required=True)
    p.add_argument("--secs", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--vhd-only", action="store_true")
    p.add_argument("--binary", default="", help="IRONLUN_BIN, when the binary was built separately")
    a = p.parse_args()
    with open(a.tsv, encoding="utf-8") as f:
        runs = parse_tsv(f.read())
    meta = {"date": a.date, "commit": a.commit, "cores": a.cores, "reps": a.reps, "secs": a.secs,
            "quick": a.quick, "vhd_only": a.vhd_only, "binary": a.binary or None}
    sys.stdout.write(dumps(meta, runs))


if __name__ == "__main__":
    main()
