"""Unit tests of table.py's SPDK column: ironlun/SPDK ratios against issue 17's goals and IOPS
per target core."""
import unittest
from collections import defaultdict

import table


def data(rows):
    vals, cpu = defaultdict(list), defaultdict(list)
    for key, target, value, us in rows:
        vals[(key, target)].append(value)
        cpu[(key, target)].append(us)
    return vals, cpu


class SpdkTable(unittest.TestCase):
    def test_per_core_is_the_inverse_of_cpu_per_op(self):
        self.assertEqual(table.per_core(4.0), 250000.0)
        self.assertIsNone(table.per_core(None))
        self.assertIsNone(table.per_core(0.0))

    def test_goals_against_spdk(self):
        vals, cpu = data([
            ("rr4k_qd1", "il", 30.0, 20.0), ("rr4k_qd1", "spdk", 34.0, 29.0),
            ("qw1m_qd8", "il", 1500.0, 90.0), ("qw1m_qd8", "spdk", 1300.0, 600.0),
        ])
        rows = {r[0]: r for r in table.spdk_rows(vals, cpu)}
        lat = rows["4 KiB random read QD1, mean latency (iscsi-perf)"]
        self.assertEqual((lat[4], lat[5], lat[6]), ("0.88×", "≤ 1.0×", "yes"))
        w = rows["1 MiB write QD8 (qemu-img bench)"]
        self.assertEqual((w[4], w[5], w[6]), ("1.15×", "≥ 1.2×", "**no**"))
        c = rows["target CPU per op: 4 KiB random read QD1"]
        self.assertEqual((c[4], c[6]), ("0.69×", "yes"))

    def test_no_spdk_rows_without_spdk_runs(self):
        vals, cpu = data([("rr4k_qd32", "il", 1.0, 1.0), ("rr4k_qd32", "tgt", 1.0, 1.0)])
        self.assertEqual(table.spdk_rows(vals, cpu), [])


if __name__ == "__main__":
    unittest.main()
