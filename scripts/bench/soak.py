#!/usr/bin/env python3
"""The soak of scripts/bench.sh --soak MINUTES: drive mixed QD32 I/O and a login/logout every
second against a running ironlun, sample its RSS, open fds and threads, and judge flatness.

Usage: soak.py run --pid PID --portal HOST:PORT --iqn IQN --file-lun N --ram-lun N
                   --minutes M --json OUT.json [--metrics URL] [--interval S] [--warmup S]
                   [--meta KEY=VALUE ...]
       soak.py report SOAK.json [--runtime-s N] > SOAK.md

run: the load, for M minutes (all clients started at t = 0, each stops by itself at the end):
  - 4 KiB random read QD32 on the file LUN: iscsi-perf -m 32 -b 8 -r, one session the whole run
  - 256 KiB sequential read QD32 on the RAM LUN: iscsi-perf -m 32 -b 512, one session
  - a writer: qemu-img bench -w -d 32 in a loop over WRITES (4 KiB, 256 KiB and 1 MiB writes on
    both LUNs, one with a flush every 1000 writes); each run is one session (login … logout)
  - login churn: once a second a fresh session that logs in, asks one thing and logs out
    (iscsi-inq, every tenth second iscsi-ls -s: a discovery session, then a normal one), cycling
    over 8 initiator names
  The daemon (PID) is sampled every S seconds: VmRSS and Threads (/proc/PID/status), open fds
  (/proc/PID/fd), CPU ticks (/proc/PID/stat) and, when --metrics is given, its logins and
  commands (/metrics), read after the /proc figures so that the scrape's own socket is not counted.
  Idle figures are taken before the clients start and once they are all gone. The JSON holds the
  samples, the load done, both idle points and analyse()'s verdict; the exit status is 0.

Flat (analyse()): the warm-up is the first WARMUP seconds (default 10 % of the run, at least
60 s). The baseline is the median of the samples in the first minute after the warm-up (early,
so that growth over the run shows; a median, so that one transient sample does not set it).
PASS needs
  - RSS: every sample after the warm-up within ±8 MiB of the baseline RSS;
  - fds: every such sample within ±8 fds of the baseline count (the clients' own sessions come
    and go: 2 to 4 connections at a time), and the idle count once the clients are gone equal to
    the idle count before they started (every connection's fd is closed again);
  - load: the two readers and the writer ended without error and did I/O, and at least 90 % of
    the run's seconds had a successful login.
Fewer than 3 samples after the warm-up (a run shorter than about 2 minutes): INCONCLUSIVE.
"""
import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

RSS_TOL_MIB = 8.0
FD_TOL = 8
LOGIN_SHARE = 0.9
MIN_POST_SAMPLES = 3
BASELINE_WINDOW_S = 60.0
# Seconds after the clients are gone for the "released" idle sample (the daemon returns free
# heap memory once it has seen no payload for 10 s, looking every 5 s).
RELEASE_WAIT_S = 25.0
# qemu-img bench writes cycled by the writer: (LUN role, size, count, extra qemu-img options)
WRITES = (
    ("file", 4096, 20000, ["-S", "1052672"]),       # 4 KiB, strided 1 MiB + 4 KiB
    ("ram", 1048576, 256, []),                       # 1 MiB
    ("ram", 4096, 20000, ["--flush-interval", "1000"]),
    ("file", 262144, 1024, []),                      # 256 KiB
)
LOGIN_NAMES = 8


def default_warmup(duration_s):
    """The warm-up of a run of duration_s seconds: 10 % of it, at least 60 s."""
    return max(60.0, 0.1 * duration_s)


# --- /proc and /metrics ---

def proc_sample(pid):
    """{rss_kib, threads, fds, cpu_ticks} of a live process."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k == "VmRSS":
                out["rss_kib"] = int(v.split()[0])
            elif k == "Threads":
                out["threads"] = int(v)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rpartition(")")[2].split()
    out["cpu_ticks"] = int(fields[11]) + int(fields[12])  # utime + stime (proc(5) fields 14, 15)
    return out


METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
SUMMED = {
    "ironlun_logins_total": "logins",
    "ironlun_discovery_logins_total": "discovery_logins",
    "ironlun_login_failures_total": "login_failures",
    "ironlun_connections_accepted_total": "connections_accepted",
    "ironlun_connections_open": "connections_open",
    "ironlun_lu_commands_total": "commands",
    "ironlun_lu_bytes_total": "bytes",
}


def metric_sums(text):
    """The families of SUMMED from a Prometheus text scrape, each summed over its labels, and
    commands/bytes also split by direction (commands_read, bytes_write, …)."""
    out = {}
    for line in text.splitlines():
        m = METRIC_LINE.match(line)
        if not m or m.group(1) not in SUMMED:
            continue
        try:
            v = float(m.group(3))
        except ValueError:
            continue
        key = SUMMED[m.group(1)]
        out[key] = out.get(key, 0) + v
        d = re.search(r'direction="([a-z]+)"', m.group(2) or "")
        if d:
            k2 = f"{key}_{d.group(1)}"
            out[k2] = out.get(k2, 0) + v
    return {k: int(v) if v == int(v) else v for k, v in out.items()}


# Bearer token for /metrics (the admin API on TCP always needs one): --metrics-token FILE.
TOKEN = ""


def scrape(url):
    if not url:
        return {}
    try:
        req = urllib.request.Request(url)
        if TOKEN:
            req.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(req, timeout=5) as r:
            return metric_sums(r.read().decode("utf-8", "replace"))
    except (OSError, ValueError):
        return {}


# --- client output ---

def perf_iops(text):
    """The last 'iops average N' of an iscsi-perf output (its progress lines end in \\r), or None."""
    vals = re.findall(r"iops average (\d+)", text.replace("\r", "\n"))
    return int(vals[-1]) if vals else None


def qemu_bench_secs(text):
    m = re.search(r"Run completed in ([0-9.]+) seconds", text)
    return float(m.group(1)) if m else None


# --- the load ---

class Children:
    """Every client process alive, so that a stop (deadline, SIGTERM) can end them all."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs = set()
        self.stop = threading.Event()

    def run(self, argv, timeout, **kw):
        """(returncode or None when stopped/timed out, output) of one client command."""
        with self.lock:
            if self.stop.is_set():
                return None, ""
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, text=True, errors="replace", **kw)
            self.procs.add(p)
        try:
            out, _ = p.communicate(timeout=timeout)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            rc = None
        finally:
            with self.lock:
                self.procs.discard(p)
        return (None if self.stop.is_set() and rc != 0 else rc), out

    def kill_all(self):
        self.stop.set()
        with self.lock:
            procs = list(self.procs)
        for p in procs:
            try:
                p.terminate()
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def reader(ch, name, argv, secs, result):
    t0 = time.monotonic()
    rc, out = ch.run(argv, secs + 60)
    iops = perf_iops(out)
    elapsed = time.monotonic() - t0
    result.update({"name": name, "command": " ".join(argv), "returncode": rc, "iops_average": iops,
                   "ops": int(iops * min(secs, elapsed)) if iops is not None else 0,
                   "ok": rc == 0 and bool(iops)})
    if not result["ok"]:
        result["output_tail"] = out[-400:]


def writer(ch, urls, deadline, result):
    result.update({"runs": 0, "failed": 0, "interrupted": 0, "ops": 0, "bytes": 0, "by_size": {},
                   "commands": [], "errors": []})
    i = 0
    while time.monotonic() < deadline and not ch.stop.is_set():
        role, size, count, extra = WRITES[i % len(WRITES)]
        i += 1
        argv = ["qemu-img", "bench", "-f", "raw", "-n", "-w", "--pattern", "90", "-d", "32",
                "-s", str(size), "-c", str(count), *extra, urls[role]]
        if len(result["commands"]) < len(WRITES):
            result["commands"].append(" ".join(argv))
        rc, out = ch.run(argv, max(deadline - time.monotonic(), 0) + 5)
        secs = qemu_bench_secs(out)
        if rc is None:
            result["interrupted"] += 1  # stopped at the deadline: not counted
            continue
        if rc != 0 or secs is None:
            result["failed"] += 1
            if len(result["errors"]) < 5:
                result["errors"].append(out[-300:])
            continue
        result["runs"] += 1
        result["ops"] += count
        result["bytes"] += count * size
        k = str(size)
        result["by_size"][k] = result["by_size"].get(k, 0) + count


def logins(ch, portal, iqn, luns, start, duration, result):
    result.update({"attempted": 0, "ok": 0, "failed": 0, "by_tool": {}, "errors": [],
                   "max_seconds": 0.0, "commands": {}})
    k = 0
    while not ch.stop.is_set():
        at = start + k
        if at >= start + duration:
            break
        delay = at - time.monotonic()
        if delay > 0 and ch.stop.wait(delay):
            break
        iname = f"iqn.2026-11.io.ironlun:soak-host{k % LOGIN_NAMES}"
        if k % 10 == 9:
            tool, argv = "iscsi-ls", ["iscsi-ls", "-i", iname, "-s", f"iscsi://{portal}"]
        else:
            tool, argv = "iscsi-inq", ["iscsi-inq", "-i", iname, f"iscsi://{portal}/{iqn}/{luns[k % 2]}"]
        k += 1
        t0 = time.monotonic()
        rc, out = ch.run(argv, 10)
        if rc is None and ch.stop.is_set():
            break
        result["attempted"] += 1
        result["max_seconds"] = max(result["max_seconds"], round(time.monotonic() - t0, 3))
        tb = result["by_tool"].setdefault(tool, {"ok": 0, "failed": 0})
        if rc == 0:
            result["ok"] += 1
            tb["ok"] += 1
        else:
            result["failed"] += 1
            tb["failed"] += 1
            if len(result["errors"]) < 5:
                result["errors"].append(f"{' '.join(argv)}: rc {rc}: {out[-200:]}")
        result.setdefault("commands", {}).setdefault(tool, " ".join(argv))


def settle(pid, metrics_url, want_fds, wait_s=15.0):
    """The idle sample once the clients are gone: the first with no open iSCSI connection (per
    /metrics) and want_fds fds, else the last one after wait_s seconds."""
    t_end = time.monotonic() + wait_s
    while True:
        time.sleep(1)
        s = proc_sample(pid)
        m = scrape(metrics_url)
        s.update({k: m[k] for k in ("connections_open",) if k in m})
        if (s["fds"] == want_fds and m.get("connections_open", 0) == 0) or time.monotonic() >= t_end:
            return s


def run(a):
    global TOKEN
    if a.metrics_token:
        with open(a.metrics_token, encoding="utf-8") as f:
            TOKEN = f.read().strip()
    duration = a.minutes * 60.0
    warmup = a.warmup if a.warmup is not None else default_warmup(duration)
    interval = a.interval or (10.0 if duration >= 600 else 5.0)
    urls = {"file": f"iscsi://{a.portal}/{a.iqn}/{a.file_lun}", "ram": f"iscsi://{a.portal}/{a.iqn}/{a.ram_lun}"}
    meta = {"minutes": a.minutes, "interval_s": interval, "warmup_s": warmup, "rss_tol_mib": RSS_TOL_MIB,
            "fd_tol": FD_TOL, "portal": a.portal, "iqn": a.iqn, "urls": urls}
    for kv in a.meta:
        k, _, v = kv.partition("=")
        meta[k] = v
    ch = Children()

    def on_signal(signum, _frame):
        ch.kill_all()
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    before = proc_sample(a.pid)
    m0 = scrape(a.metrics)
    before.update({k: m0[k] for k in ("connections_open",) if k in m0})
    secs = int(round(duration))
    readers = [
        ("4 KiB random read QD32, file LUN",
         ["iscsi-perf", "-i", "iqn.2026-11.io.ironlun:soak-r4k", "-m", "32", "-b", "8", "-t", str(secs), "-r", urls["file"]]),
        ("256 KiB sequential read QD32, RAM LUN",
         ["iscsi-perf", "-i", "iqn.2026-11.io.ironlun:soak-r256k", "-m", "32", "-b", "512", "-t", str(secs), urls["ram"]]),
    ]
    load = {"readers": [{} for _ in readers], "writer": {}, "logins": {}}
    start = time.monotonic()
    threads = [threading.Thread(target=reader, args=(ch, n, argv, secs, load["readers"][i]), daemon=True)
               for i, (n, argv) in enumerate(readers)]
    threads.append(threading.Thread(target=writer, args=(ch, urls, start + duration, load["writer"]), daemon=True))
    threads.append(threading.Thread(target=logins, args=(ch, a.portal, a.iqn, (a.file_lun, a.ram_lun), start,
                                                         duration, load["logins"]), daemon=True))
    for t in threads:
        t.start()
    samples = []
    try:
        k = 0
        while True:
            at = start + k * interval
            if at > start + duration - 0.5:
                break
            time.sleep(max(0.0, at - time.monotonic()))
            s = {"t": round(time.monotonic() - start, 1), **proc_sample(a.pid)}
            s.update(scrape(a.metrics))
            samples.append(s)
            print(f"[soak {s['t']:.0f}s] RSS {s['rss_kib'] / 1024:.1f} MiB, fds {s['fds']}, threads "
                  f"{s['threads']}" + (f", logins {s['logins']}" if "logins" in s else ""), file=sys.stderr)
            k += 1
        for t in threads:
            t.join(timeout=max(0.0, start + duration - time.monotonic()) + 90)
    finally:
        ch.kill_all()
    load["elapsed_s"] = round(time.monotonic() - start, 1)
    after = settle(a.pid, a.metrics, before["fds"])
    # The daemon gives free heap memory back after about 10 s without payload (crate::heap):
    # one more look once that has surely happened (reported, not judged).
    time.sleep(max(0.0, start + load["elapsed_s"] + RELEASE_WAIT_S - time.monotonic()))
    released = proc_sample(a.pid)
    m1 = scrape(a.metrics)
    load["metrics_delta"] = {k: m1[k] - m0.get(k, 0) for k in m1 if k != "connections_open"} if m1 and m0 else {}
    doc = {"meta": meta, "idle": {"before": before, "after": after, "released": released}, "load": load,
           "samples": samples}
    doc["analysis"] = analyse(samples, warmup, duration, before, after, load)
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    an = doc["analysis"]
    print(f"[soak] {an['verdict']}: {'; '.join(an['reasons']) or 'RSS and fds flat, load applied'}",
          file=sys.stderr)


# --- analysis ---

def _slope_per_hour(points):
    """Least-squares slope of (t seconds, value) points, per hour; None with fewer than 2."""
    if len(points) < 2:
        return None
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / den * 3600


def analyse(samples, warmup_s, duration_s, idle_before, idle_after, load,
            rss_tol_mib=RSS_TOL_MIB, fd_tol=FD_TOL):
    """The verdict on one soak (see the module documentation for the definition of flat)."""
    post = [s for s in samples if s["t"] >= warmup_s]
    out = {"warmup_s": warmup_s, "rss_tol_mib": rss_tol_mib, "fd_tol": fd_tol, "samples": len(samples),
           "post_warmup_samples": len(post), "reasons": []}
    reasons = out["reasons"]
    # load
    rd = load.get("readers", [])
    wr = load.get("writer", {})
    lg = load.get("logins", {})
    readers_ok = bool(rd) and all(r.get("ok") for r in rd)
    writer_ok = wr.get("ops", 0) > 0 and wr.get("failed", 0) == 0
    need = int(LOGIN_SHARE * int(duration_s))
    logins_ok = lg.get("ok", 0) >= need
    out["load_ok"] = readers_ok and writer_ok and logins_ok
    out["logins_needed"] = need
    if not readers_ok:
        reasons.append("a reader failed or did no I/O: " + ", ".join(r.get("name", "?") for r in rd if not r.get("ok")))
    if not writer_ok:
        reasons.append(f"writer: {wr.get('ops', 0)} writes, {wr.get('failed', 0)} failed runs")
    if not logins_ok:
        reasons.append(f"logins: {lg.get('ok', 0)} succeeded, {need} needed ({LOGIN_SHARE:.0%} of {int(duration_s)} s)")
    if len(post) < MIN_POST_SAMPLES:
        out.update(verdict="INCONCLUSIVE", rss_flat=None, fds_flat=None)
        reasons.insert(0, f"{len(post)} samples after the {warmup_s:g} s warm-up, {MIN_POST_SAMPLES} needed "
                          "(run longer)")
        return out
    win = [s for s in post if s["t"] < warmup_s + BASELINE_WINDOW_S]
    rss = [s["rss_kib"] / 1024 for s in post]
    b = statistics.median(s["rss_kib"] / 1024 for s in win)
    fd_base = statistics.median_low(s["fds"] for s in win)
    out["baseline_window_s"] = [warmup_s, warmup_s + BASELINE_WINDOW_S]
    out["baseline_samples"] = len(win)
    dev = max(abs(v - b) for v in rss)
    out["rss_mib"] = {
        "baseline": round(b, 2), "min": round(min(rss), 2), "max": round(max(rss), 2),
        "median": round(statistics.median(rss), 2), "spread": round(max(rss) - min(rss), 2),
        "max_deviation": round(dev, 2), "end_minus_baseline": round(rss[-1] - b, 2),
        "slope_per_hour": _round(_slope_per_hour([(s["t"], s["rss_kib"] / 1024) for s in post]), 2),
        "first": round(samples[0]["rss_kib"] / 1024, 2) if samples else None,
    }
    out["rss_flat"] = dev <= rss_tol_mib
    if not out["rss_flat"]:
        worst = max(post, key=lambda s: abs(s["rss_kib"] / 1024 - b))
        reasons.append(f"RSS {worst['rss_kib'] / 1024:.1f} MiB at {worst['t']:g} s, {dev:.1f} MiB from the "
                       f"baseline {b:.1f} MiB (tolerance ±{rss_tol_mib:g})")
    fds = [s["fds"] for s in post]
    fdev = max(abs(v - fd_base) for v in fds)
    out["fds"] = {"baseline": fd_base, "min": min(fds), "max": max(fds), "max_deviation": fdev,
                  "idle_before": idle_before.get("fds"), "idle_after": idle_after.get("fds")}
    back = idle_after.get("fds") == idle_before.get("fds")
    out["fds_flat"] = fdev <= fd_tol and back
    if fdev > fd_tol:
        reasons.append(f"fds reached {max(fds)} (baseline {fd_base}, tolerance ±{fd_tol})")
    if not back:
        reasons.append(f"idle fds {idle_after.get('fds')} after the load, {idle_before.get('fds')} before")
    th = [s["threads"] for s in post]
    out["threads"] = {"min": min(th), "max": max(th),
                      "idle_before": idle_before.get("threads"), "idle_after": idle_after.get("threads")}
    out["idle_rss_mib"] = {"before": _round(idle_before.get("rss_kib", 0) / 1024, 2),
                           "after": _round(idle_after.get("rss_kib", 0) / 1024, 2)}
    out["verdict"] = "PASS" if out["rss_flat"] and out["fds_flat"] and out["load_ok"] else "FAIL"
    return out


def _round(v, n):
    return None if v is None else round(v, n)


# --- report ---

def _fmt_int(n):
    return f"{n:,}".replace(",", " ")


def report(doc):
    """The markdown report of a soak JSON document."""
    m, an, ld = doc["meta"], doc["analysis"], doc["load"]
    lines = []
    mins = m.get("minutes")
    head = (f"**ironlun soak** (`scripts/bench.sh --soak {mins:g}`), {m.get('date', 'date unknown')}, "
            f"commit {m.get('commit', 'unknown')}")
    if m.get("binary"):
        head += f" (binary: {m['binary']}, built separately)"
    head += f", {m.get('cores', '?')} cores, total runtime {m.get('runtime_s', '?')} s."
    lines += [head, "", f"**Verdict: {an['verdict']}**" + (f" — {'; '.join(an['reasons'])}" if an["reasons"] else
                                                          " — RSS and fds flat after the warm-up, load applied."), ""]
    lines.append(f"Flat: after a warm-up of {an['warmup_s']:g} s, every sample within ±{an['rss_tol_mib']:g} MiB "
                 f"(RSS) and ±{an['fd_tol']} (fds) of the baseline, the median of the samples in the first minute "
                 "after the warm-up; and the idle fd count after the load equal to the one before it. Samples every "
                 f"{m.get('interval_s', '?'):g} s: {an['samples']} in all, {an['post_warmup_samples']} after the warm-up.")
    lines.append("")
    if "rss_mib" in an:
        r, f, t = an["rss_mib"], an["fds"], an["threads"]
        slope = "n/a" if r["slope_per_hour"] is None else f"{r['slope_per_hour']:+.2f} MiB/h"
        lines += ["| figure | value |", "| --- | --- |",
                  f"| RSS at the first sample / baseline | {r['first']} / {r['baseline']} MiB |",
                  f"| RSS after warm-up: min – max (spread) | {r['min']} – {r['max']} MiB ({r['spread']} MiB) |",
                  f"| RSS largest deviation from the baseline | {r['max_deviation']} MiB (limit {an['rss_tol_mib']:g}) |",
                  f"| RSS last sample − baseline; trend | {r['end_minus_baseline']:+} MiB; {slope} |",
                  f"| fds after warm-up: baseline, min – max | {f['baseline']}, {f['min']} – {f['max']} (limit ±{an['fd_tol']}) |",
                  f"| idle fds before / after the load | {f['idle_before']} / {f['idle_after']} |",
                  f"| threads after warm-up: min – max; idle before / after | {t['min']} – {t['max']}; {t['idle_before']} / {t['idle_after']} |",
                  f"| idle RSS before / after the load | {an['idle_rss_mib']['before']} / {an['idle_rss_mib']['after']} MiB |"]
    rel = doc.get("idle", {}).get("released")
    if rel and "rss_kib" in rel:
        lines.append(f"| idle RSS {RELEASE_WAIT_S:g} s after the load (free heap given back) | "
                     f"{_round(rel['rss_kib'] / 1024, 2)} MiB |")
    else:
        lines += ["| figure | value |", "| --- | --- |"]
    for r in ld.get("readers", []):
        lines.append(f"| {r.get('name', '?')} (iscsi-perf) | {_fmt_int(r.get('iops_average') or 0)} IOPS average, "
                     f"≈ {_fmt_int(r.get('ops', 0))} reads{'' if r.get('ok') else ', **failed**'} |")
    w = ld.get("writer", {})
    sizes = ", ".join(f"{_fmt_int(v)} × {_size(int(k))}" for k, v in sorted(w.get("by_size", {}).items(), key=lambda kv: int(kv[0])))
    lines.append(f"| writes (qemu-img bench runs) | {_fmt_int(w.get('ops', 0))} writes, {w.get('bytes', 0) / 2**30:.1f} GiB in "
                 f"{w.get('runs', 0)} runs ({sizes or 'none'}); {w.get('failed', 0)} failed |")
    lg = ld.get("logins", {})
    rate = lg.get("ok", 0) / ld["elapsed_s"] if ld.get("elapsed_s") else 0
    lines.append(f"| login churn | {lg.get('ok', 0)} login/logout sessions ok of {lg.get('attempted', 0)} "
                 f"({rate:.2f}/s; {lg.get('failed', 0)} failed; slowest {lg.get('max_seconds', 0)} s) |")
    md = ld.get("metrics_delta") or {}
    if md:
        lines.append(f"| daemon's own count (/metrics, run delta) | {_fmt_int(md.get('logins', 0))} logins, "
                     f"{_fmt_int(md.get('discovery_logins', 0))} discovery logins, {md.get('login_failures', 0)} login failures, "
                     f"{_fmt_int(md.get('commands_read', 0))} reads, {_fmt_int(md.get('commands_write', 0))} writes, "
                     f"{md.get('bytes', 0) / 2**30:.1f} GiB |")
    lines += ["", "Commands (all started together, each stops by itself at the end of the run):", ""]
    lines.append(f"- target: `ironlun serve` (release build, {m.get('luns', 'LUN 0 file, LUN 1 RAM')}), "
                 "127.0.0.1; sampled: VmRSS and Threads of /proc/PID/status, entries of /proc/PID/fd")
    for r in ld.get("readers", []):
        lines.append(f"- {r.get('name', '?')}: `{r.get('command', '?')}`")
    for c in w.get("commands", []):
        lines.append(f"- writer, in turn: `{c}`")
    cmds = lg.get("commands", {})
    if cmds:
        lines.append("- login churn, one new session a second, 8 initiator names in turn: "
                     + "; every tenth second ".join(f"`{cmds[t]}`" for t in ("iscsi-inq", "iscsi-ls") if t in cmds))
    lines.append("")
    return "\n".join(lines)


def _size(n):
    return f"{n // 1048576} MiB" if n % 1048576 == 0 else f"{n // 1024} KiB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--pid", type=int, required=True)
    r.add_argument("--portal", required=True)
    r.add_argument("--iqn", required=True)
    r.add_argument("--file-lun", type=int, default=0)
    r.add_argument("--ram-lun", type=int, default=1)
    r.add_argument("--minutes", type=float, required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--metrics", default="")
    r.add_argument("--metrics-token", default="", help="file holding the admin API's bearer token")
    r.add_argument("--interval", type=float, default=None)
    r.add_argument("--warmup", type=float, default=None)
    r.add_argument("--meta", action="append", default=[], help="KEY=VALUE recorded in meta")
    rp = sub.add_parser("report")
    rp.add_argument("json")
    rp.add_argument("--runtime-s", type=int, default=None, help="also record the total runtime in the JSON")
    a = p.parse_args(argv)
    if a.cmd == "run":
        run(a)
        return
    with open(a.json, encoding="utf-8") as f:
        doc = json.load(f)
    if a.runtime_s is not None:
        doc["meta"]["runtime_s"] = a.runtime_s
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
    sys.stdout.write(report(doc))


if __name__ == "__main__":
    main()
