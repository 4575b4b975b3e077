#!/usr/bin/env python3
"""The scripts/bench.sh results as one SVG chart: ironlun against tgt, one row per workload.

Usage: chart.py RESULTS OUT.svg
RESULTS: results.json (or the raw RESULTS.tsv, without the run's date, commit and cores);
results.py describes both. Each workload of table.py's WORKLOADS gets two horizontal bars, the
ironlun and the tgt median, with min–max whiskers and the median written beside the bar in the
workload's unit. Workloads have different units, so each row has its own scale (zero at the
left). On the right, the ironlun/tgt ratio of the medians, green where issue #3's goal is met,
red where it is not. Standard library only: the SVG is built with xml.etree.
"""
import sys
import xml.etree.ElementTree as ET

from results import load
from table import WORKLOADS, fmt, summary

TARGETS = (("il", "ironlun", "#2f6db5"), ("tgt", "tgt", "#9a9a9a"))
FONT = "DejaVu Sans, Verdana, Arial, sans-serif"
GOOD, BAD, INK, GREY = "#1a7f37", "#c62828", "#1f1f1f", "#5f5f5f"

WIDTH = 1000
LABEL_X = 16          # workload names
BAR_X, BAR_W = 400, 390  # bar area; the largest value in a row spans BAR_FILL of it
BAR_FILL = 0.74
RATIO_X = 818         # ironlun/tgt column
BAR_H, BAR_GAP = 15, 4
ROW_H = 2 * BAR_H + BAR_GAP + 17
HEAD_H = 118


def _el(parent, tag, text=None, **attrs):
    e = ET.SubElement(parent, tag, {k.rstrip("_").replace("_", "-"): str(v) for k, v in attrs.items()})
    if text is not None:
        e.text = text
    return e


def _text(parent, x, y, s, size=12, fill=INK, weight=None, anchor=None, style=None):
    a = {"x": f"{x:.1f}", "y": f"{y:.1f}", "font_size": size, "fill": fill}
    if weight:
        a["font_weight"] = weight
    if anchor:
        a["text_anchor"] = anchor
    if style:
        a["font_style"] = style
    return _el(parent, "text", s, **a)


def _stats(vals):
    """(median, min, max, n) of the successful runs, or None when every run failed."""
    v = [x for x in vals if x is not None]
    if not v:
        return None
    m, _ = summary(v)
    return m, min(v), max(v), len(v)


def _title(meta):
    date = meta.get("date") or "date unknown"
    commit = meta.get("commit") or "unknown"
    cores = meta.get("cores")
    cores = f"{cores} cores" if cores else "cores unknown"
    return f"ironlun vs tgt (scripts/bench.sh), {date}, commit {commit}, {cores}"


def _subtitle(meta):
    """Two lines: what runs where, and what the marks mean."""
    reps, secs = meta.get("reps"), meta.get("secs")
    runs = f"median of {reps} repetitions" if reps and reps > 1 else "one repetition" if reps else "median"
    per = f" ({secs} s per iscsi-perf run)" if secs else ""
    built = "; ironlun binary built separately" if meta.get("binary") else ""
    marks = "no min–max whiskers with one repetition" if reps == 1 else "whiskers: min–max"
    return ("Both targets on 127.0.0.1 serve the same page-cached 1 GiB file; the same client commands run "
            f"against each, alternating{built}.",
            f"Bar: {runs}{per}; {marks}. Each row has its own scale, starting at zero.")


def render(vals, meta):
    """The SVG document (str) for the (KEY, TARGET) → measurements map of results.load()."""
    rows = WORKLOADS
    head = HEAD_H + (18 if meta.get("quick") else 0)
    height = head + ROW_H * len(rows) + 44
    svg = ET.Element("svg", {
        "xmlns": "http://www.w3.org/2000/svg", "width": str(WIDTH), "height": str(height),
        "viewBox": f"0 0 {WIDTH} {height}", "font-family": FONT, "role": "img",
    })
    title = _title(meta)
    _el(svg, "title", title)
    _el(svg, "rect", x=0, y=0, width=WIDTH, height=height, fill="#ffffff")
    _text(svg, LABEL_X, 26, title, size=17, weight="bold")
    sub1, sub2 = _subtitle(meta)
    _text(svg, LABEL_X, 46, sub1, size=11.5, fill=GREY)
    _text(svg, LABEL_X, 61, sub2, size=11.5, fill=GREY)
    if meta.get("quick"):
        _text(svg, LABEL_X, 80, "Quick run (scripts/bench.sh -q: 1 repetition, 2 s runs): it checks that the "
              "script works; its numbers are not representative.", size=12, fill=BAD, weight="bold")
    # legend and column heads
    y = head - 14
    x = BAR_X
    for _, name, color in TARGETS:
        _el(svg, "rect", x=x, y=y - 11, width=12, height=12, fill=color)
        _text(svg, x + 17, y, name, size=12.5)
        x += 90
    _text(svg, LABEL_X, y, "workload (unit)", size=12, fill=GREY, weight="bold")
    _text(svg, RATIO_X, y, "ironlun/tgt (goal)", size=12, fill=GREY, weight="bold")
    _el(svg, "line", x1=LABEL_X, y1=y + 7, x2=WIDTH - 16, y2=y + 7, stroke="#c8c8c8")
    # the zero of every row's scale
    _el(svg, "line", x1=BAR_X, y1=head - 2, x2=BAR_X, y2=head + ROW_H * len(rows) - 8, stroke="#8a8a8a")

    for i, (key, label, unit, better, goal) in enumerate(rows):
        top = head + i * ROW_H
        if i:
            _el(svg, "line", x1=LABEL_X, y1=top - 5, x2=WIDTH - 16, y2=top - 5, stroke="#ececec")
        g = _el(svg, "g", class_="workload", data_key=key)
        name, _, tool = label.partition(" (")
        _text(g, LABEL_X, top + 14, name, size=12.5)
        sense = "lower is better" if better == "lo" else "higher is better"
        _text(g, LABEL_X, top + 30, f"{unit}, {sense}" + (f"; {tool.rstrip(')')}" if tool else ""),
              size=11, fill=GREY)
        stats = {t: _stats(vals.get((key, t), [])) for t, _, _ in TARGETS}
        top_val = max((s[2] for s in stats.values() if s), default=0.0)
        scale = BAR_W * BAR_FILL / top_val if top_val > 0 else 0.0
        for j, (t, tname, color) in enumerate(TARGETS):
            by = top + 2 + j * (BAR_H + BAR_GAP)
            s = stats[t]
            if s is None:
                _text(g, BAR_X + 4, by + BAR_H - 3, f"{tname}: no result", size=11, fill=BAD, style="italic")
                continue
            med, lo, hi, n = s
            w = max(med * scale, 1.0)
            bar = _el(g, "rect", class_=f"bar {tname}", data_target=t, x=BAR_X, y=by, width=f"{w:.1f}",
                      height=BAR_H, fill=color)
            _el(bar, "title", f"{tname}: median {fmt(med)} {unit}, min {fmt(lo)}, max {fmt(hi)} ({n} runs)")
            cy = by + BAR_H / 2
            x_lo, x_hi = BAR_X + lo * scale, BAR_X + hi * scale
            if n > 1 and x_hi - x_lo >= 0.5:
                wh = _el(g, "g", class_="whisker", stroke=INK, stroke_width=1.2)
                _el(wh, "line", x1=f"{x_lo:.1f}", y1=f"{cy:.1f}", x2=f"{x_hi:.1f}", y2=f"{cy:.1f}")
                for xe in (x_lo, x_hi):
                    _el(wh, "line", x1=f"{xe:.1f}", y1=f"{cy - 4:.1f}", x2=f"{xe:.1f}", y2=f"{cy + 4:.1f}")
            _text(g, max(BAR_X + w, x_hi) + 6, by + BAR_H - 3, f"{fmt(med)} {unit}", size=11.5,
                  weight="bold" if t == "il" else None)
        il, tg = stats["il"], stats["tgt"]
        cmp = "≥" if better == "hi" else "≤"
        goal_txt = f"goal {cmp} {goal:.1f}×" if goal is not None else "no goal set"
        if il is None or tg is None or tg[0] == 0:
            _text(g, RATIO_X, top + 17, "n/a", size=15, fill=GREY, weight="bold")
            _text(g, RATIO_X, top + 33, goal_txt, size=11, fill=GREY)
            continue
        r = il[0] / tg[0]
        if goal is None:
            color, verdict = INK, ""
        else:
            met = r >= goal if better == "hi" else r <= goal
            color, verdict = (GOOD, ": met") if met else (BAD, ": not met")
        _text(g, RATIO_X, top + 17, f"{r:.2f}×", size=15, fill=color, weight="bold")
        _text(g, RATIO_X, top + 33, goal_txt + verdict, size=11, fill=color if goal is not None else GREY)

    foot = head + ROW_H * len(rows) + 14
    _text(svg, LABEL_X, foot, "Ratios of medians (for latency lower is better); goals from issue #3. "
          "Commands, target CPU per operation, the RAM-LUN ceiling, the iperf3 loopback ceiling and RSS:",
          size=11, fill=GREY)
    _text(svg, LABEL_X, foot + 15, "bench-results/latest.md (the table in README.md § Performance). "
          "Client and targets share the machine's cores; compare ratios within one run.", size=11, fill=GREY)
    ET.indent(svg)
    return ET.tostring(svg, encoding="unicode") + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    vals, _, meta = load(sys.argv[1])
    doc = render(vals, meta)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(doc)


if __name__ == "__main__":
    main()
