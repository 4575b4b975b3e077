#!/usr/bin/env python3
"""Tests of the soak analysis, report and chart (scripts/bench/soak.py, soak_chart.py) over
synthetic samples; no daemon, no clients.

Run: python3 -m unittest discover -s scripts/bench -p 'test_*.py'
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import soak  # noqa: E402
import soak_chart  # noqa: E402

NS = {"s": "http://www.w3.org/2000/svg"}
SVG = "{http://www.w3.org/2000/svg}"
MIB = 1024  # KiB


def samples(n=19, step=10, rss=lambda i: 100 * MIB, fds=lambda i: 25, threads=lambda i: 6):
    """n samples every step seconds from t = 0, with commands growing 1000 a second."""
    return [{"t": float(i * step), "rss_kib": int(rss(i)), "fds": fds(i), "threads": threads(i),
             "cpu_ticks": i * 100, "commands": i * step * 1000, "logins": i * step} for i in range(n)]


def good_load(secs=180):
    return {"readers": [{"name": "4 KiB random read QD32, file LUN", "ok": True, "iops_average": 40000,
                         "ops": 40000 * secs, "command": "iscsi-perf …"},
                        {"name": "256 KiB sequential read QD32, RAM LUN", "ok": True, "iops_average": 1500,
                         "ops": 1500 * secs, "command": "iscsi-perf …"}],
            "writer": {"runs": 20, "failed": 0, "interrupted": 1, "ops": 400000, "bytes": 3 << 30,
                       "by_size": {"4096": 400000}, "commands": ["qemu-img bench …"]},
            "logins": {"attempted": secs, "ok": secs, "failed": 0, "max_seconds": 0.2,
                       "commands": {"iscsi-inq": "iscsi-inq URL", "iscsi-ls": "iscsi-ls -s URL"}},
            "elapsed_s": float(secs), "metrics_delta": {"logins": secs + 22, "commands_read": 7, "bytes": 1 << 30}}


IDLE = {"rss_kib": 90 * MIB, "fds": 22, "threads": 14}


def analyse(smp, load=None, before=IDLE, after=IDLE, warmup=60.0, duration=180.0):
    return soak.analyse(smp, warmup, duration, before, after, load or good_load(int(duration)))


class AnalyseTest(unittest.TestCase):
    def test_flat_run_passes(self):
        # warm-up growth (t < 60 s) is not judged; afterwards ±3 MiB of noise
        smp = samples(rss=lambda i: (80 + 2 * i if i < 6 else 100 + (3 if i % 2 else -3)) * MIB)
        an = analyse(smp)
        self.assertEqual(an["verdict"], "PASS", an["reasons"])
        self.assertEqual(an["post_warmup_samples"], 13)
        # baseline: the median of t = 60 … 110 s (97, 103, 97, 103, 97, 103)
        self.assertEqual(an["rss_mib"]["baseline"], 100.0)
        self.assertEqual(an["baseline_samples"], 6)
        self.assertEqual(an["baseline_window_s"], [60.0, 120.0])
        self.assertEqual(an["rss_mib"]["spread"], 6.0)
        self.assertEqual(an["rss_mib"]["max_deviation"], 3.0)
        self.assertEqual(an["rss_mib"]["first"], 80.0)
        self.assertTrue(an["rss_flat"] and an["fds_flat"] and an["load_ok"])
        self.assertEqual(an["reasons"], [])

    def test_tolerance_is_inclusive_and_relative_to_the_baseline(self):
        an = analyse(samples(rss=lambda i: (100 if i < 18 else 108) * MIB))
        self.assertEqual(an["verdict"], "PASS")
        an = analyse(samples(rss=lambda i: (100 if i < 18 else 92) * MIB))
        self.assertEqual(an["verdict"], "PASS")
        an = analyse(samples(rss=lambda i: (100 if i < 18 else 108.2) * MIB))
        self.assertEqual(an["verdict"], "FAIL")
        self.assertFalse(an["rss_flat"])
        self.assertIn("108.2 MiB at 180 s", an["reasons"][0])

    def test_slow_leak_fails_and_has_a_slope(self):
        # 1 MiB a sample (every 10 s): 360 MiB/h; baseline 108.5 (median of 106 … 111), 118 at the end
        an = analyse(samples(rss=lambda i: (100 + i) * MIB))
        self.assertEqual(an["verdict"], "FAIL")
        self.assertAlmostEqual(an["rss_mib"]["slope_per_hour"], 360.0, places=1)
        self.assertEqual(an["rss_mib"]["baseline"], 108.5)
        self.assertEqual(an["rss_mib"]["end_minus_baseline"], 9.5)
        self.assertTrue(an["fds_flat"])

    def test_one_transient_sample_does_not_set_the_baseline(self):
        # a spike right at the end of the warm-up: the baseline stays at the level, the spike
        # itself is still a sample outside the band
        an = analyse(samples(rss=lambda i: (93 if i == 6 else 82) * MIB, fds=lambda i: 40 if i == 6 else 25))
        self.assertEqual(an["rss_mib"]["baseline"], 82.0)
        self.assertEqual(an["fds"]["baseline"], 25)
        self.assertEqual(an["verdict"], "FAIL")
        self.assertIn("RSS 93.0 MiB at 60 s, 11.0 MiB from the baseline 82.0 MiB", an["reasons"][0])
        self.assertIn("fds reached 40 (baseline 25", an["reasons"][1])
        an = analyse(samples(rss=lambda i: (89 if i == 6 else 82) * MIB))
        self.assertEqual(an["verdict"], "PASS")

    def test_fd_leak_and_fds_not_back_to_idle(self):
        an = analyse(samples(fds=lambda i: 25 + i))          # +12 after the baseline
        self.assertEqual(an["verdict"], "FAIL")
        self.assertFalse(an["fds_flat"])
        self.assertTrue(an["rss_flat"])
        self.assertIn("fds reached 43", an["reasons"][0])
        an = analyse(samples(fds=lambda i: 25 + (2 if i % 3 else 0)))   # client churn: fine
        self.assertEqual(an["verdict"], "PASS")
        an = analyse(samples(), after=dict(IDLE, fds=23))
        self.assertEqual(an["verdict"], "FAIL")
        self.assertEqual(an["reasons"], ["idle fds 23 after the load, 22 before"])

    def test_load_must_be_applied(self):
        load = good_load()
        load["readers"][1]["ok"] = False
        an = analyse(samples(), load=load)
        self.assertEqual(an["verdict"], "FAIL")
        self.assertFalse(an["load_ok"])
        self.assertIn("256 KiB sequential read", an["reasons"][0])
        load = good_load()
        load["logins"]["ok"] = 161                            # 90 % of 180 s is 162
        an = analyse(samples(), load=load)
        self.assertEqual(an["verdict"], "FAIL")
        self.assertEqual(an["logins_needed"], 162)
        load = good_load()
        load["writer"]["failed"] = 1
        self.assertEqual(analyse(samples(), load=load)["verdict"], "FAIL")

    def test_too_short_is_inconclusive(self):
        an = analyse(samples(n=8), duration=75.0)             # t = 60, 70 after the warm-up
        self.assertEqual(an["verdict"], "INCONCLUSIVE")
        self.assertIsNone(an["rss_flat"])
        self.assertIn("2 samples after the 60 s warm-up", an["reasons"][0])

    def test_default_warmup(self):
        self.assertEqual(soak.default_warmup(120), 60.0)
        self.assertEqual(soak.default_warmup(1800), 180.0)


class ParseTest(unittest.TestCase):
    def test_perf_iops(self):
        out = "iops average 1000 \r  iops average 41739 \rFinished\n"
        self.assertEqual(soak.perf_iops(out), 41739)
        self.assertIsNone(soak.perf_iops("Failed to login\n"))

    def test_qemu_bench_secs(self):
        self.assertEqual(soak.qemu_bench_secs("Sending 256 requests...\nRun completed in 1.234 seconds.\n"), 1.234)
        self.assertIsNone(soak.qemu_bench_secs("error"))

    def test_metric_sums(self):
        text = "\n".join([
            "# HELP ironlun_logins_total Logins.",
            "# TYPE ironlun_logins_total counter",
            'ironlun_logins_total{target="a"} 3',
            'ironlun_logins_total{target="b"} 4',
            "ironlun_discovery_logins_total 2",
            'ironlun_lu_commands_total{target="a",lun="0",direction="read"} 100',
            'ironlun_lu_commands_total{target="a",lun="1",direction="read"} 50',
            'ironlun_lu_commands_total{target="a",lun="0",direction="write"} 7',
            'ironlun_lu_bytes_total{target="a",lun="0",direction="read"} 4096',
            'ironlun_connections_open{portal="127.0.0.1:3270"} 0',
            'ironlun_lu_command_duration_seconds_bucket{le="0.1"} 9',
        ])
        m = soak.metric_sums(text)
        self.assertEqual(m, {"logins": 7, "discovery_logins": 2, "commands": 157, "commands_read": 150,
                             "commands_write": 7, "bytes": 4096, "bytes_read": 4096, "connections_open": 0})


def doc_for(smp, verdict_load=None, warmup=60.0):
    load = verdict_load or good_load()
    an = soak.analyse(smp, warmup, 180.0, IDLE, IDLE, load)
    return {"meta": {"minutes": 3, "interval_s": 10, "warmup_s": warmup, "date": "2026-12-06 06:00 UTC",
                     "commit": "abc1234", "cores": "2", "runtime_s": 200},
            "idle": {"before": IDLE, "after": IDLE}, "load": load, "samples": smp, "analysis": an}


class ChartTest(unittest.TestCase):
    def texts(self, root):
        return ["".join(t.itertext()) for t in root.iter(SVG + "text")]

    def test_flat_run(self):
        root = ET.fromstring(soak_chart.render(doc_for(samples())))
        self.assertEqual(root.tag, SVG + "svg")
        w, h = float(root.get("width")), float(root.get("height"))
        self.assertEqual(root.get("viewBox"), f"0 0 {w:g} {h:g}")
        t = self.texts(root)
        self.assertIn("PASS", t)
        self.assertIn("ironlun soak (scripts/bench.sh --soak 3)", t[0])
        self.assertIn("commit abc1234", t[0])
        panels = [g.get("data-panel") for g in root.iter(SVG + "g") if g.get("data-panel")]
        self.assertEqual(panels, ["rss", "fds", "io"])
        # one point per sample on the RSS and fd lines; none outside the band
        for cls in ("series rss", "series fds", "series threads"):
            g = root.find(f".//s:g[@class='{cls}']", NS)
            self.assertEqual(len(g.findall("s:circle", NS)), 19, cls)
            self.assertEqual(len(g.find("s:polyline", NS).get("points").split()), 19)
        self.assertEqual([c for c in root.iter(SVG + "circle") if c.get("fill") == soak_chart.BAD], [])
        # the warm-up is shaded over the first 60 of 180 s, the band from there to the end
        rss = root.find(".//s:g[@data-panel='rss']", NS)
        wu = rss.find("s:rect[@class='warmup']", NS)
        self.assertAlmostEqual(float(wu.get("width")), soak_chart.PLOT_W / 3, places=0)
        band = rss.find("s:g[@class='band rss-band']/s:rect", NS)
        self.assertAlmostEqual(float(band.get("x")), soak_chart.PLOT_X + soak_chart.PLOT_W / 3, places=0)
        self.assertAlmostEqual(float(band.get("width")), soak_chart.PLOT_W * 2 / 3, places=0)
        self.assertIn("100.0 ± 8 MiB", self.texts(root))
        self.assertIn("fd band: 25 ± 8", self.texts(root))

    def test_band_is_16_mib_tall_on_the_rss_scale(self):
        root = ET.fromstring(soak_chart.render(doc_for(samples())))
        rss = root.find(".//s:g[@data-panel='rss']", NS)
        band = rss.find("s:g[@class='band rss-band']/s:rect", NS)
        # the y ticks: labels right-aligned left of the plot, numbers in MiB
        ticks = sorted((float(t.get("y")), float(t.text)) for t in rss.findall("s:text[@text-anchor='end']", NS))
        (y_a, v_a), (y_b, v_b) = ticks[0], ticks[-1]
        px_per_mib = (y_b - y_a) / (v_a - v_b)
        self.assertAlmostEqual(float(band.get("height")) / px_per_mib, 16.0, places=1)

    def test_leak_is_red(self):
        d = doc_for(samples(rss=lambda i: (100 + i) * MIB))
        root = ET.fromstring(soak_chart.render(d))
        self.assertIn("FAIL", self.texts(root))
        red = [c for c in root.find(".//s:g[@class='series rss']", NS).findall("s:circle", NS)
               if c.get("fill") == soak_chart.BAD]
        self.assertEqual(len(red), 2)            # 117 and 118 MiB against the baseline 108.5 ± 8
        band = root.find(".//s:g[@class='band rss-band']/s:rect", NS)
        self.assertEqual(band.get("fill"), soak_chart.BAD)
        # a warm-up sample far from the baseline is not marked
        d = doc_for(samples(rss=lambda i: (60 if i == 0 else 100) * MIB))
        root = ET.fromstring(soak_chart.render(d))
        self.assertIn("PASS", self.texts(root))
        self.assertEqual([c for c in root.iter(SVG + "circle") if c.get("fill") == soak_chart.BAD], [])

    def test_inconclusive_and_no_metrics(self):
        smp = samples(n=5)
        for s in smp:
            del s["commands"]
        root = ET.fromstring(soak_chart.render(doc_for(smp)))
        self.assertIn("INCONCLUSIVE", self.texts(root))
        self.assertIsNone(root.find(".//s:g[@data-panel='io']", NS))
        self.assertIsNone(root.find(".//s:g[@class='band rss-band']", NS))

    def test_nice_ticks(self):
        self.assertEqual(soak_chart.nice_ticks(0, 30, 8), [0, 5, 10, 15, 20, 25, 30])
        self.assertEqual(soak_chart.nice_ticks(92, 118), [90, 100, 110, 120])
        self.assertEqual(soak_chart.nice_ticks(92, 108), [90, 95, 100, 105, 110])
        self.assertEqual(soak_chart.nice_ticks(5, 5)[0], 5)

    def test_cli_and_report(self):
        d = doc_for(samples())
        with tempfile.TemporaryDirectory() as tmp:
            js, svg = os.path.join(tmp, "soak.json"), os.path.join(tmp, "soak.svg")
            with open(js, "w", encoding="utf-8") as f:
                json.dump(d, f)
            subprocess.run([sys.executable, os.path.join(HERE, "soak_chart.py"), js, svg], check=True)
            ET.parse(svg)
            md = subprocess.run([sys.executable, os.path.join(HERE, "soak.py"), "report", js, "--runtime-s", "321"],
                                check=True, capture_output=True, text=True).stdout
            with open(js, encoding="utf-8") as f:
                self.assertEqual(json.load(f)["meta"]["runtime_s"], 321)
        self.assertIn("**Verdict: PASS**", md)
        self.assertIn("total runtime 321 s", md)
        self.assertIn("| RSS largest deviation from the baseline | 0.0 MiB (limit 8) |", md)
        self.assertIn("| idle fds before / after the load | 22 / 22 |", md)
        self.assertIn("180 login/logout sessions ok of 180", md)
        self.assertIn("`iscsi-ls -s URL`", md)


if __name__ == "__main__":
    unittest.main()
