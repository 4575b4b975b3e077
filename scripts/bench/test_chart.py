#!/usr/bin/env python3
"""Tests of the bench report renderers over testdata/results.json (a 3-repetition run).

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

import chart  # noqa: E402
import results  # noqa: E402
import table  # noqa: E402

FIXTURE = os.path.join(HERE, "testdata", "results.json")
NS = {"s": "http://www.w3.org/2000/svg"}


def texts(root):
    return ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]


class ChartTest(unittest.TestCase):
    def setUp(self):
        self.vals, _, self.meta = results.load(FIXTURE)
        self.root = ET.fromstring(chart.render(self.vals, self.meta))

    def test_parses_as_svg(self):
        self.assertEqual(self.root.tag, "{http://www.w3.org/2000/svg}svg")
        w, h = float(self.root.get("width")), float(self.root.get("height"))
        self.assertEqual(self.root.get("viewBox"), f"0 0 {w:g} {h:g}")

    def test_one_bar_per_target_per_workload(self):
        groups = self.root.findall("s:g[@class='workload']", NS)
        self.assertEqual([g.get("data-key") for g in groups], [w[0] for w in table.WORKLOADS])
        for g in groups:
            bars = g.findall("s:rect", NS)
            self.assertEqual(sorted(b.get("data-target") for b in bars), ["il", "tgt"], g.get("data-key"))
            self.assertEqual(len(g.findall("s:g[@class='whisker']", NS)), 2)

    def test_bar_lengths_follow_medians(self):
        g = self.root.find("s:g[@data-key='rr4k_qd32']", NS)
        w = {b.get("data-target"): float(b.get("width")) for b in g.findall("s:rect", NS)}
        # medians 116052 and 35681 IOPS on one scale
        self.assertAlmostEqual(w["il"] / w["tgt"], 116052 / 35681, places=2)
        self.assertLessEqual(max(w.values()), chart.BAR_W)

    def test_labels(self):
        t = texts(self.root)
        title = t[0]
        for part in ("ironlun vs tgt", "2026-11-26 13:59 UTC", "commit 1477345", "2 cores"):
            self.assertIn(part, title)
        for _, label, _, _, _ in table.WORKLOADS:
            self.assertIn(label.split(" (")[0], t)
        for s in ("116052 IOPS", "35681 IOPS", "42.2 µs", "56.6 µs", "1529 MB/s", "857 MB/s"):
            self.assertIn(s, t)
        for s in ("3.25×", "goal ≥ 2.0×: met", "0.75×", "goal ≤ 0.7×: not met", "1.98×"):
            self.assertIn(s, t)
        self.assertIn("ironlun", t)
        self.assertIn("tgt", t)
        self.assertFalse(any("Quick run" in s for s in t))

    def test_quick_run_and_failed_runs(self):
        with open(FIXTURE, encoding="utf-8") as f:
            doc = json.load(f)
        doc["meta"]["quick"] = True
        for r in doc["runs"]:
            if r["key"] == "qw1m_qd8" and r["target"] == "tgt":
                r["value"] = None
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(doc, f)
        try:
            vals, _, meta = results.load(f.name)
        finally:
            os.unlink(f.name)
        root = ET.fromstring(chart.render(vals, meta))
        t = texts(root)
        self.assertTrue(any(s.startswith("Quick run") for s in t))
        g = root.find("s:g[@data-key='qw1m_qd8']", NS)
        self.assertEqual([b.get("data-target") for b in g.findall("s:rect", NS)], ["il"])
        gt = texts(g)
        self.assertIn("tgt: no result", gt)
        self.assertIn("n/a", gt)

    def test_cli_writes_file(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "latest.svg")
            subprocess.run([sys.executable, os.path.join(HERE, "chart.py"), FIXTURE, out], check=True)
            ET.parse(out)


class ResultsTest(unittest.TestCase):
    TSV = "rr4k_qd32\til\t100\t8.5\nrr4k_qd32\ttgt\tnan\tnan\niperf\t-\t3000\nshort\n"

    def test_tsv_to_json_round_trip(self):
        runs = results.parse_tsv(self.TSV)
        self.assertEqual(runs, [
            {"key": "rr4k_qd32", "target": "il", "value": 100.0, "cpu_us_per_op": 8.5},
            {"key": "rr4k_qd32", "target": "tgt", "value": None, "cpu_us_per_op": None},
            {"key": "iperf", "target": "-", "value": 3000.0},
        ])
        doc = json.loads(results.dumps({"commit": "abc"}, runs))
        self.assertEqual(doc, {"meta": {"commit": "abc"}, "runs": runs})

    def test_json_and_tsv_load_alike(self):
        with tempfile.TemporaryDirectory() as d:
            tsv, js = os.path.join(d, "r.tsv"), os.path.join(d, "r.json")
            with open(tsv, "w", encoding="utf-8") as f:
                f.write(self.TSV)
            out = subprocess.run([sys.executable, os.path.join(HERE, "results.py"), tsv, "--date", "D",
                                  "--commit", "C", "--cores", "2", "--reps", "1", "--secs", "2", "--quick"],
                                 check=True, capture_output=True, text=True).stdout
            with open(js, "w", encoding="utf-8") as f:
                f.write(out)
            v1, c1, m1 = results.load(tsv)
            v2, c2, m2 = results.load(js)
        self.assertEqual((v1, c1), (v2, c2))
        self.assertEqual(m1, {})
        self.assertEqual(m2["quick"], True)
        self.assertEqual(m2["cores"], 2)
        self.assertEqual(v2[("rr4k_qd32", "tgt")], [None])
        self.assertNotIn(("iperf", "-"), c2)

    def test_table_reads_the_json(self):
        with tempfile.TemporaryDirectory() as d:
            h, c = os.path.join(d, "h"), os.path.join(d, "c")
            for p, s in ((h, "HEADER"), (c, "COMMANDS")):
                with open(p, "w", encoding="utf-8") as f:
                    f.write(s + "\n")
            out = subprocess.run([sys.executable, os.path.join(HERE, "table.py"), FIXTURE, h, c],
                                 check=True, capture_output=True, text=True).stdout
        self.assertIn("| 4 KiB random read QD32 (iscsi-perf) | IOPS | 116052 (115277–118840) | "
                      "35681 (34213–36665) | 3.25× | ≥ 2.0× | yes |", out)


if __name__ == "__main__":
    unittest.main()
