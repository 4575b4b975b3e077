"""Unit tests of scripts/check-layers.py: test code and comments are not imports, cycles and
layers are found."""

import importlib.util
import os
import unittest

_spec = importlib.util.spec_from_file_location(
    "check_layers", os.path.join(os.path.dirname(__file__), "check-layers.py"))
cl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cl)


class CheckLayers(unittest.TestCase):
    def test_strips_test_modules_with_nested_braces_and_strings(self):
        text = ('use crate::a;\n#[cfg(test)]\nmod tests {\n    fn f() { let s = "}"; }\n'
                '    use crate::b;\n}\nuse crate::c;\n#[cfg(test)]\nmod more;\n')
        self.assertEqual(cl.strip_tests(text), "use crate::a;\n\nuse crate::c;\n\n")

    def test_finds_a_cycle_and_no_false_one(self):
        cyc = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        self.assertEqual([c for c in cl.sccs(cyc) if len(c) > 1], [["a", "b", "c"]])
        dag = {"a": set(), "b": {"a"}, "c": {"a", "b"}}
        self.assertEqual([c for c in cl.sccs(dag) if len(c) > 1], [])

    def test_layers_put_each_module_above_what_it_uses(self):
        dag = {"admin": {"target", "config"}, "target": {"config"}, "config": set(), "log": set()}
        self.assertEqual(cl.layers(dag), [["config", "log"], ["target"], ["admin"]])


if __name__ == "__main__":
    unittest.main()
