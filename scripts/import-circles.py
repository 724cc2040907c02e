#!/usr/bin/env python3
"""Import circles in src/: between files, and between the top-level parts (a folder of
src/ counts as one part, a file at the top as another). Exits 1 if there is any.

usage: scripts/import-circles.py [--verbose]

A file imports another when its code names an item the other defines: through `use`,
or through a path in the code (`crate::a::b`, `super::x`). Paths are followed through
`pub use` re-exports to the file that defines the item. Test modules (`#[cfg(test)]
mod ... { }`), comments, string and character literals are skipped. A `mod` declaration
is not an import. ARCHITECTURE.md, "The layers", is the order this keeps true.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_files():
    """Module path (tuple) -> file."""
    files = {}
    for root, _, names in os.walk(SRC):
        for name in names:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(root, name)
            parts = os.path.relpath(path, SRC)[:-3].split(os.sep)
            if parts == ["lib"]:
                parts = []
            elif parts[-1] == "mod":
                parts = parts[:-1]
            files[tuple(parts)] = path
    return files


def strip_code(text):
    """The text with comments, literals and #[cfg(test)] modules blanked out."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
        elif re.match(r'b?r(#*)"', text[i:i + 40]):
            m = re.match(r'b?r(#*)"', text[i:])
            end = '"' + m.group(1)
            j = text.find(end, i + m.end())
            i = n if j < 0 else j + len(end)
            out.append('""')
        elif c == '"' or text.startswith('b"', i):
            i += 2 if c == "b" else 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'" and re.match(r"'(\\.[^']*|[^\\'])'", text[i:i + 12]):
            # A character literal (a lifetime has no closing quote).
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            i += m.end()
            out.append("' '")
        else:
            out.append(c)
            i += 1
    code = "".join(out)
    # Drop every #[cfg(test)] module, braces matched.
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", code)
        if not m:
            return code
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        code = code[: m.start()] + code[j:]


def use_leaves(tree):
    """`a::{b, c::{d, e}}` -> ['a::b', 'a::c::d', 'a::c::e']."""
    tree = re.sub(r"\s+", "", tree)
    brace = tree.find("{")
    if brace < 0:
        return [re.sub(r"as\w+$", "", tree)]
    prefix, body = tree[:brace], tree[brace + 1: tree.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += (ch == "{") - (ch == "}")
        cur += ch
    if cur:
        parts.append(cur)
    leaves = []
    for part in parts:
        for leaf in use_leaves(part):
            leaves.append(prefix.rstrip(":") if leaf == "self" else prefix + leaf)
    return leaves


def absolute(module, path, files):
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    if segs[0] == "crate":
        return segs[1:]
    if segs[0] in ("self", "super"):
        base = list(module)
        while segs and segs[0] in ("self", "super"):
            if segs[0] == "super":
                if not base:
                    return None
                base.pop()
            segs = segs[1:]
        return base + segs
    if tuple(list(module) + [segs[0]]) in files:
        return list(module) + segs
    return None


def main():
    verbose = "--verbose" in sys.argv
    files = module_files()
    code = {m: strip_code(open(p, encoding="utf-8").read()) for m, p in files.items()}
    uses = {}  # module -> [(is_pub, leaf)]
    for m, text in code.items():
        uses[m] = [
            (bool(u.group(1)), leaf)
            for u in re.finditer(r"(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", text)
            for leaf in use_leaves(u.group(2))
        ]
    # Every name a `use` brings into a module, public or not: a child's `super::X` that
    # names its parent's import of X depends on X's own file.
    reexports = {}
    for m, leaves in uses.items():
        for _, leaf in leaves:
            target = absolute(m, leaf, files)
            if target:
                reexports[(m, target[-1])] = target

    def defining(path, depth=0):
        module = ()
        for i, seg in enumerate(path):
            if module + (seg,) in files:
                module += (seg,)
                continue
            target = reexports.get((module, seg))
            if target and depth < 20 and target != path[: i + 1]:
                return defining(target + path[i + 1:], depth + 1)
            return module
        return module

    edges = {m: {} for m in files}
    for m, text in code.items():
        paths = [leaf for is_pub, leaf in uses[m] if not is_pub]
        body = re.sub(r"(pub(?:\([^)]*\))?\s+)?use\s+[^;]+;", "", text)
        paths += re.findall(r"\b(?:crate|super|self)(?:::\w+)+", body)
        # A path through a child module (`tls::prepare`): relative to this module.
        paths += [
            p for p in re.findall(r"(?<![\w:])[a-z_]\w*(?:::\w+)+", body)
            if m + (p.split("::")[0],) in files
        ]
        for path in paths:
            target = absolute(m, path, files)
            if target is None:
                continue
            t = defining(target)
            if t != m and t in files:
                edges[m].setdefault(t, path)

    def circles(graph):
        index, low, stack, on, found = {}, {}, [], set(), []
        counter = [0]

        def visit(v):
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in graph[v]:
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
                if len(comp) > 1:
                    found.append(sorted(comp))

        sys.setrecursionlimit(10000)
        for v in graph:
            if v not in index:
                visit(v)
        return found

    def name(m):
        return os.path.relpath(files[m], os.path.join(SRC, ".."))

    file_circles = circles({m: set(e) for m, e in edges.items()})
    # Parts: a top-level folder of src/ is one part; lib.rs is left out (it only declares
    # modules and re-exports them).
    part = lambda m: m[0] if m else None
    parts = {}
    for m, e in edges.items():
        if part(m) is None:
            continue
        parts.setdefault(part(m), set()).update(
            part(t) for t in e if part(t) not in (None, part(m))
        )
    part_circles = circles(parts)
    for comp in file_circles:
        print("file circle: " + " <-> ".join(name(m) for m in comp))
        if verbose:
            for m in comp:
                for t, path in edges[m].items():
                    if t in comp:
                        print(f"    {name(m)} -> {name(t)}: {path}")
    for comp in part_circles:
        print("part circle: " + " <-> ".join(comp))
    if verbose:
        for p in sorted(parts):
            print(f"part {p} imports: {', '.join(sorted(parts[p])) or '-'}")
    print(f"file circles: {len(file_circles)}, part circles: {len(part_circles)}")
    sys.exit(1 if file_circles or part_circles else 0)


main()
