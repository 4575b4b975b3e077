#!/usr/bin/env python3
"""Check the layering the README's "Architecture" section describes.

1. Crates (from `cargo metadata`): `ironlun-api` depends on no other crate of the workspace;
   `ironlun-cli` depends on `ironlun-api` and the offline libraries it drives
   (`ironlun-backstore` for `ironlun vhd`, `ironlun-coordinator` for `ironlun migrate`),
   never on the daemon (`ironlun`).
   `ironlun-testkit` (the test harness) is a dev-dependency only, except of the test-only
   `ironlun-initiator-tests`.
2. Sources: no `ironlun::` path in the CLI crate; no `ironlun_cli` in the daemon's library
   (only its binary, `main.rs`, uses the CLI).
3. Modules: the `use crate::…` / `crate::…` references between the daemon library's top-level
   modules (test code excluded) form no cycle. The layers (each module depends only on
   layers below it) are printed, and must equal the block between `<!-- layers:begin -->`
   and `<!-- layers:end -->` in README.md.

Exit status 0 when all hold, 1 otherwise (each failure is printed). Run by scripts/test.sh.
"""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMON_SRC = os.path.join(ROOT, "crates", "ironlun", "src")
CLI_SRC = os.path.join(ROOT, "crates", "cli", "src")
CLI_MAY_USE = {"ironlun-api", "ironlun-backstore", "ironlun-coordinator"}
TESTKIT = "ironlun-testkit"
# Test-only packages whose library is the harness of their own tests.
TESTKIT_MAY_BE_USED_BY = {"ironlun-initiator-tests"}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def workspace_deps():
    """Each workspace package's normal (not dev, not build) dependencies among the workspace's."""
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    meta = json.loads(out)
    names = {p["name"] for p in meta["packages"]}
    deps = {}
    for p in meta["packages"]:
        deps[p["name"]] = {
            d["name"] for d in p["dependencies"]
            if d["name"] in names and d.get("kind") is None
        }
    return deps


def strip_tests(text):
    """The text without `#[cfg(test)]` items (a `mod … { … }` block or a `mod …;` line)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*([;{])", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        if m.group(1) == ";":
            i = m.end()
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            c = text[j]
            if c == '"':  # skip a string literal
                j += 1
                while j < len(text) and text[j] != '"':
                    j += 2 if text[j] == "\\" else 1
            elif c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def rust_files(path):
    if os.path.isfile(path):
        yield path
        return
    for dirpath, _, files in os.walk(path):
        for f in sorted(files):
            if f.endswith(".rs"):
                yield os.path.join(dirpath, f)


def code_of(path):
    """The file's code: test items and comments (doc links are no imports) removed."""
    text = strip_tests(open(path, encoding="utf-8").read())
    return re.sub(r"(?m)(^|\s)//.*$", r"\1", text)


def daemon_modules():
    lib = open(os.path.join(DAEMON_SRC, "lib.rs"), encoding="utf-8").read()
    mods = re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", strip_tests(lib), re.M)
    found = {}
    for m in mods:
        f = os.path.join(DAEMON_SRC, m + ".rs")
        d = os.path.join(DAEMON_SRC, m)
        paths = [p for p in (f, d) if os.path.exists(p)]
        found[m] = [r for p in paths for r in rust_files(p)
                    if not re.search(r"(^|/)(tests|\w+_tests)\.rs$", r)]
    return found


def module_graph(mods):
    graph = {}
    for m, files in mods.items():
        refs = set()
        for f in files:
            for r in re.findall(r"\bcrate::(\w+)", code_of(f)):
                if r in mods and r != m:
                    refs.add(r)
        graph[m] = refs
    return graph


def sccs(graph):
    """Tarjan's strongly connected components."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layers(graph):
    level = {}

    def depth(v):
        if v not in level:
            level[v] = 1 + max((depth(w) for w in graph[v]), default=-1)
        return level[v]

    for v in graph:
        depth(v)
    rows = {}
    for v, l in level.items():
        rows.setdefault(l, []).append(v)
    return [sorted(rows[l]) for l in sorted(rows)]


def main():
    deps = workspace_deps()
    if deps.get("ironlun-api"):
        fail(f"ironlun-api depends on {sorted(deps['ironlun-api'])}; it must stand alone")
    cli = deps.get("ironlun-cli")
    if cli is None:
        fail("no ironlun-cli crate")
    elif not cli <= CLI_MAY_USE:
        fail(f"ironlun-cli depends on {sorted(cli - CLI_MAY_USE)} (allowed: {sorted(CLI_MAY_USE)})")
    else:
        print(f"ok: ironlun-cli depends on {sorted(cli)}; ironlun-api on no workspace crate")

    users = sorted(p for p, d in deps.items() if TESTKIT in d and p not in TESTKIT_MAY_BE_USED_BY)
    if users:
        fail(f"{', '.join(users)}: uses {TESTKIT} outside [dev-dependencies]")
    else:
        print(f"ok: {TESTKIT} is a dev-dependency only (and of {sorted(TESTKIT_MAY_BE_USED_BY)})")

    for f in rust_files(CLI_SRC):
        for n, line in enumerate(open(f, encoding="utf-8"), 1):
            if re.search(r"\bironlun::", line) and not line.lstrip().startswith("//"):
                fail(f"{os.path.relpath(f, ROOT)}:{n}: the CLI names the daemon: {line.strip()}")
    for f in rust_files(DAEMON_SRC):
        if os.path.basename(f) == "main.rs":
            continue
        if "ironlun_cli" in code_of(f):
            fail(f"{os.path.relpath(f, ROOT)}: the daemon library uses ironlun_cli")

    graph = module_graph(daemon_modules())
    cycles = [c for c in sccs(graph) if len(c) > 1]
    for c in cycles:
        edges = [f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c]
        fail(f"import cycle among {', '.join(c)}: {'; '.join(edges)}")
    if not cycles:
        rows = layers(graph)
        block = "\n".join(f"{i}: {' '.join(r)}" for i, r in enumerate(rows))
        print(f"ok: no import cycle among the daemon's {len(graph)} modules; layers (bottom first):")
        print(block)
        readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
        m = re.search(r"<!-- layers:begin -->\n```text\n(.*?)```\n<!-- layers:end -->", readme, re.S)
        if not m:
            fail("README.md has no <!-- layers:begin --> ```text … ``` <!-- layers:end --> block")
        elif m.group(1).strip() != block:
            fail("README.md's layers block differs from the modules' imports; it should read:\n" + block)
        else:
            print("ok: README.md's layers block matches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
