#!/usr/bin/env python3
"""The soak of scripts/bench.sh --soak as one SVG chart: ironlun's RSS, open fds and threads over
the run, the warm-up shaded, the ±8 MiB (RSS) and ±8 (fds) bands around the baseline drawn, and
the load the daemon served (its commands per second, from /metrics) underneath.

Usage: soak_chart.py SOAK.json OUT.svg
SOAK.json is what soak.py run writes (soak.py describes it and the definition of flat). Standard
library only, in the style of chart.py (xml.etree, the same fonts and colours).
"""
import math
import sys
import json
import xml.etree.ElementTree as ET

from chart import BAD, FONT, GOOD, GREY, INK, _el, _text

WIDTH = 1000
PLOT_X, PLOT_W = 90, 780      # plot area; legends to the right of it
LEGEND_X = PLOT_X + PLOT_W + 18
HEAD_H = 122
PANEL_GAP = 52
RSS_H, FD_H, IO_H = 230, 150, 110
RSS_COLOR, FD_COLOR, THREAD_COLOR, IO_COLOR = "#2f6db5", "#8e44ad", "#d9822b", "#5f8f3a"
WARMUP_FILL = "#eeeeee"
VERDICT_COLOR = {"PASS": GOOD, "FAIL": BAD}


def nice_ticks(lo, hi, n=5):
    """Round tick values covering [lo, hi] (about n of them), step 1, 2 or 5 × 10^k."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _fmt(v):
    return f"{v:g}" if abs(v) < 1e6 else f"{v:.3g}"


class Panel:
    """One plot: x in seconds over [0, x_max], y over the ticks' range, drawn at (PLOT_X, top)."""

    def __init__(self, svg, top, height, x_max, y_lo, y_hi, ylabel, warmup):
        self.g = _el(svg, "g", class_="panel")
        self.top, self.h, self.x_max = top, height, x_max
        self.yt = nice_ticks(y_lo, y_hi)
        self.y0, self.y1 = self.yt[0], self.yt[-1]
        g = self.g
        _el(g, "rect", x=PLOT_X, y=top, width=PLOT_W, height=height, fill="#ffffff", stroke="#c8c8c8")
        if warmup > 0:
            wx = self.x(min(warmup, x_max))
            _el(g, "rect", class_="warmup", x=PLOT_X, y=top, width=f"{wx - PLOT_X:.1f}", height=height, fill=WARMUP_FILL)
            _text(g, PLOT_X + 5, top + 13, "warm-up", size=10.5, fill=GREY, style="italic")
        for v in self.yt:
            y = self.y(v)
            _el(g, "line", x1=PLOT_X, y1=f"{y:.1f}", x2=PLOT_X + PLOT_W, y2=f"{y:.1f}", stroke="#ececec")
            _text(g, PLOT_X - 6, y + 4, _fmt(v), size=10.5, fill=GREY, anchor="end")
        _text(g, PLOT_X, top - 8, ylabel, size=12, fill=INK, weight="bold")
        step = nice_ticks(0, x_max / 60, 8)
        for mn in step:
            if mn * 60 > x_max + 1e-6:
                break
            x = self.x(mn * 60)
            _el(g, "line", x1=f"{x:.1f}", y1=top + height, x2=f"{x:.1f}", y2=top + height + 4, stroke="#8a8a8a")
            _text(g, x, top + height + 16, _fmt(mn), size=10.5, fill=GREY, anchor="middle")

    def x(self, t):
        return PLOT_X + PLOT_W * (t / self.x_max if self.x_max > 0 else 0)

    def y(self, v):
        span = self.y1 - self.y0 or 1
        return self.top + self.h - self.h * (v - self.y0) / span

    def band(self, t0, t1, lo, hi, fill, label, cls):
        lo, hi = max(lo, self.y0), min(hi, self.y1)
        y_hi, y_lo = self.y(hi), self.y(lo)
        b = _el(self.g, "g", class_=cls)
        _el(b, "rect", x=f"{self.x(t0):.1f}", y=f"{y_hi:.1f}", width=f"{self.x(t1) - self.x(t0):.1f}",
            height=f"{y_lo - y_hi:.1f}", fill=fill, fill_opacity="0.16")
        for y in (y_hi, y_lo):
            _el(b, "line", x1=f"{self.x(t0):.1f}", y1=f"{y:.1f}", x2=f"{self.x(t1):.1f}", y2=f"{y:.1f}",
                stroke=fill, stroke_dasharray="5 3", stroke_width=1)
        if label:
            _text(b, self.x(t1) - 4, y_hi - 4, label, size=10.5, fill=fill, anchor="end")

    def line(self, pts, color, name, cls, marks=True, bad=None):
        """A polyline of (t, v) points with a dot per point; bad(t, v) → drawn in red."""
        if not pts:
            return
        g = _el(self.g, "g", class_=cls)
        _el(g, "polyline", points=" ".join(f"{self.x(t):.1f},{self.y(v):.1f}" for t, v in pts), fill="none",
            stroke=color, stroke_width=1.8, stroke_linejoin="round")
        if marks and len(pts) <= 400:
            for t, v in pts:
                c = _el(g, "circle", cx=f"{self.x(t):.1f}", cy=f"{self.y(v):.1f}", r=2.4,
                        fill=BAD if bad and bad(t, v) else color)
                _el(c, "title", f"{name}: {_fmt(round(v, 2))} at {t:g} s")


def _legend(g, x, y, items):
    for i, (color, label) in enumerate(items):
        yy = y + i * 17
        _el(g, "line", x1=x, y1=yy - 4, x2=x + 16, y2=yy - 4, stroke=color, stroke_width=2.5)
        _text(g, x + 21, yy, label, size=11, fill=INK)


def render(doc):
    """The SVG document (str) of a soak.py JSON document."""
    meta, an, samples, load = doc["meta"], doc["analysis"], doc["samples"], doc.get("load", {})
    duration = float(meta.get("minutes", 0)) * 60 or (samples[-1]["t"] if samples else 60.0)
    warmup = float(an.get("warmup_s", 0))
    tol, ftol = float(an.get("rss_tol_mib", 8)), an.get("fd_tol", 8)
    io = []
    for a, b in zip(samples, samples[1:]):
        if "commands" in a and "commands" in b and b["t"] > a["t"]:
            io.append(((a["t"] + b["t"]) / 2, (b["commands"] - a["commands"]) / (b["t"] - a["t"]) / 1000))
    height = HEAD_H + RSS_H + PANEL_GAP + FD_H + (PANEL_GAP + IO_H if io else 0) + 66
    svg = ET.Element("svg", {
        "xmlns": "http://www.w3.org/2000/svg", "width": str(WIDTH), "height": str(height),
        "viewBox": f"0 0 {WIDTH} {height}", "font-family": FONT, "role": "img",
    })
    verdict = an.get("verdict", "?")
    title = (f"ironlun soak (scripts/bench.sh --soak {float(meta.get('minutes', 0)):g}), "
             f"{meta.get('date') or 'date unknown'}, commit {meta.get('commit') or 'unknown'}, "
             f"{meta.get('cores') or '?'} cores")
    _el(svg, "title", f"{title}: {verdict}")
    _el(svg, "rect", x=0, y=0, width=WIDTH, height=height, fill="#ffffff")
    _text(svg, 16, 26, title, size=17, weight="bold")
    _text(svg, WIDTH - 16, 27, verdict, size=20, weight="bold", anchor="end",
          fill=VERDICT_COLOR.get(verdict, GREY)).set("class", "verdict")
    lg = load.get("logins", {})
    wr = load.get("writer", {})
    _text(svg, 16, 46, "Load: 4 KiB random reads QD32 (file LUN) and 256 KiB sequential reads QD32 (RAM LUN), "
          "4 KiB – 1 MiB writes QD32 (both LUNs),", size=11.5, fill=GREY)
    _text(svg, 16, 61, f"and a new session logging in and out every second ({lg.get('ok', 0)} logins ok, "
          f"{lg.get('failed', 0)} failed; {wr.get('runs', 0)} writer sessions). "
          f"Samples every {float(meta.get('interval_s', 0)):g} s.", size=11.5, fill=GREY)
    _text(svg, 16, 76, f"Flat: after the warm-up ({warmup:g} s), every sample within ±{tol:g} MiB (RSS) and "
          f"±{ftol} (fds) of the baseline (median of the first minute after it); idle fds after the load = before.",
          size=11.5, fill=GREY)
    if an.get("reasons"):
        _text(svg, 16, 92, "; ".join(an["reasons"])[:170], size=11.5, fill=BAD if verdict == "FAIL" else GREY,
              weight="bold")

    x_max = max(duration, samples[-1]["t"] if samples else 0) or 60.0
    r, f = an.get("rss_mib"), an.get("fds")
    # RSS
    top = HEAD_H
    rss = [(s["t"], s["rss_kib"] / 1024) for s in samples]
    vals = [v for _, v in rss] or [0.0]
    lo, hi = min(vals), max(vals)
    if r:
        b = r["baseline"]
        lo, hi = min(lo, b - tol - 2), max(hi, b + tol + 2)
    p = Panel(svg, top, RSS_H, x_max, max(0.0, lo), hi, "RSS of the ironlun process (VmRSS, MiB)", warmup)
    p.g.set("data-panel", "rss")
    if r:
        band_color = GOOD if an.get("rss_flat") else BAD
        p.band(warmup, x_max, b - tol, b + tol, band_color, None, "band rss-band")
        _text(svg, LEGEND_X, top + 92, "band: baseline", size=10.5, fill=band_color)
        _text(svg, LEGEND_X, top + 107, f"{b:.1f} ± {tol:g} MiB", size=10.5, fill=band_color)
    p.line(rss, RSS_COLOR, "RSS MiB", "series rss",
           bad=(lambda t, v: t >= warmup and abs(v - b) > tol) if r else None)
    _legend(svg, LEGEND_X, top + 14, [(RSS_COLOR, "VmRSS")])
    if r:
        _text(svg, LEGEND_X, top + 40, f"spread {r['spread']:g} MiB", size=10.5, fill=GREY)
        _text(svg, LEGEND_X, top + 55, f"max dev. {r['max_deviation']:g} MiB", size=10.5, fill=GREY)
        _text(svg, LEGEND_X, top + 70, f"end {r['end_minus_baseline']:+g} MiB", size=10.5, fill=GREY)
    # fds and threads
    top += RSS_H + PANEL_GAP
    fds = [(s["t"], s["fds"]) for s in samples]
    th = [(s["t"], s["threads"]) for s in samples]
    vals = [v for _, v in fds + th] or [0]
    lo, hi = min(vals), max(vals)
    if f:
        fb = f["baseline"]
        lo, hi = min(lo, fb - ftol), max(hi, fb + ftol)
    p = Panel(svg, top, FD_H, x_max, max(0, lo), hi, "Open fds and threads", warmup)
    p.g.set("data-panel", "fds")
    if f:
        band_color = GOOD if an.get("fds_flat") else BAD
        p.band(warmup, x_max, fb - ftol, fb + ftol, band_color, None, "band fd-band")
        _text(svg, LEGEND_X, top + 68, f"fd band: {fb} ± {ftol}", size=10.5, fill=band_color)
    p.line(fds, FD_COLOR, "open fds", "series fds",
           bad=(lambda t, v: t >= warmup and abs(v - fb) > ftol) if f else None)
    p.line(th, THREAD_COLOR, "threads", "series threads")
    _legend(svg, LEGEND_X, top + 14, [(FD_COLOR, "open fds"), (THREAD_COLOR, "threads")])
    if f:
        _text(svg, LEGEND_X, top + 50, f"idle fds {f['idle_before']} → {f['idle_after']}", size=10.5, fill=GREY)
    # the load
    if io:
        top += FD_H + PANEL_GAP
        p = Panel(svg, top, IO_H, x_max, 0, max(v for _, v in io), "Load: thousand SCSI commands per second (the daemon's /metrics)", warmup)
        p.g.set("data-panel", "io")
        p.line(io, IO_COLOR, "thousand commands/s", "series io", marks=False)
        _legend(svg, LEGEND_X, top + 14, [(IO_COLOR, "kcmd/s")])
    foot = top + (IO_H if io else FD_H) + 34
    _text(svg, PLOT_X + PLOT_W / 2, foot, "minutes since the load started", size=11, fill=GREY, anchor="middle")
    _text(svg, 16, foot + 22, "Red dots: samples after the warm-up outside the band. Figures, commands and the load done: "
          "bench-results/soak.md (scripts/bench/soak.py).", size=11, fill=GREY)
    ET.indent(svg)
    return ET.tostring(svg, encoding="unicode") + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = json.load(f)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(render(doc))


if __name__ == "__main__":
    main()
