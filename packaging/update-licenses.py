#!/usr/bin/env python3
"""The licences of every crate in nodeherd's packages, from `cargo metadata`.

    packaging/update-licenses.py [--check] [--vendor DIR]

writes, from Cargo.lock and the crates themselves:

  debian/copyright
      machine-readable (DEP-5); it covers the whole source package: the tree,
      and one Files: paragraph per crate under vendor/ (every crate
      Cargo.lock names, as the vendored-crates tarball holds them), its
      Copyright: lines taken from the crate's own licence files (or, when
      they name nobody, its Cargo.toml authors), its License: from its
      Cargo.toml; then the text of every licence used, from
      packaging/licenses/.
  rpm/nodeherd.spec, between "# BEGIN bundled crates" and "# END bundled
  crates"
      License: the SPDX expression of the binary package: nodeherd's own
      licence AND that of each crate linked into the binary; and one
      Provides: bundled(crate(NAME)) = VERSION for each of those crates.
  packaging/bundled-crates.txt
      NAME VERSION LICENSE of each crate linked into the binary (the RPM
      ships it, and those crates' licence files, under %license).

A crate is linked into the binary when nodeherd reaches it through normal
dependencies (not dev- or build-dependencies) on a Linux target
(LINUX_TARGETS) and it is not a proc-macro (whose code runs in the compiler).
This is what Fedora's %cargo_license counts (cargo tree --edges
no-build,no-dev,no-proc-macro), on Linux only.

--check writes nothing; it exits 1 and shows the difference when a file is
not what this script would write (the packaging test runs it).
--vendor DIR reads the crates from DIR (an unpacked vendored-crates
tarball) instead of cargo's registry, offline, and checks that DIR holds
exactly the crates of Cargo.lock.

Needs cargo (CARGO=, else cargo from PATH) and Python 3.9.
"""

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LICENSE_TEXTS = ROOT / "packaging" / "licenses"
COPYRIGHT = ROOT / "debian" / "copyright"
SPEC = ROOT / "rpm" / "nodeherd.spec"
BUNDLED = ROOT / "packaging" / "bundled-crates.txt"

# Linux targets of Debian's and Fedora's release architectures: the crates
# linked on any of them count (the spec's list cannot vary by architecture).
LINUX_TARGETS = [
    "x86_64-unknown-linux-gnu",
    "i686-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "armv7-unknown-linux-gnueabihf",
    "powerpc64le-unknown-linux-gnu",
    "s390x-unknown-linux-gnu",
    "riscv64gc-unknown-linux-gnu",
]

OWN_LICENSE = "MIT OR Apache-2.0"
OWN_COPYRIGHT = "2026 The nodeherd developers"

# SPDX identifier -> DEP-5 short name, where they differ.
DEP5_NAMES = {
    "BSD-2-Clause": "BSD-2-clause",
    "BSD-3-Clause": "BSD-3-clause",
    "LGPL-2.1-or-later": "LGPL-2.1+",
}
DEP5_EXCEPTIONS = {"LLVM-exception": "LLVM exception"}

LICENSE_FILE = re.compile(
    r"^(licen[cs]e|copying|copyright|notice|unlicense|authors)([-_.].*)?$", re.I
)
# "Copyright (c) 2014 Someone", "Copyright © ...", "Copyright 2019 ...":
# a copyright notice, not a heading or a sentence about one.
COPYRIGHT_LINE = re.compile(r"^\s*(?:[#*/;]+\s*)?copyright\s*((?:\(c\)|©)\s*\S.*|\d.*)$", re.I)


def die(msg):
    print(f"update-licenses.py: {msg}", file=sys.stderr)
    sys.exit(1)


# ------------------------------------------------------------------ SPDX


def spdx_parse(expr):
    """An SPDX expression as a tree: ("OR", [..]), ("AND", [..]), or a str
    leaf ("MIT", "Apache-2.0 WITH LLVM-exception"). Accepts the old "/"."""
    tokens = re.findall(r"\(|\)|/|[A-Za-z0-9.+-]+", expr)
    if "".join(tokens) != re.sub(r"\s+", "", expr):
        die(f"cannot read licence expression {expr!r}")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def primary():
        t = take()
        if t == "(":
            node = disjunction()
            if take() != ")":
                die(f"unbalanced parentheses in {expr!r}")
            return node
        if t in ("AND", "OR", "WITH", ")", "/"):
            die(f"unexpected {t!r} in {expr!r}")
        if peek() == "WITH":
            take()
            return f"{t} WITH {take()}"
        return t

    def conjunction():
        items = [primary()]
        while peek() == "AND":
            take()
            items.append(primary())
        return items[0] if len(items) == 1 else ("AND", items)

    def disjunction():
        items = [conjunction()]
        while peek() in ("OR", "/"):
            take()
            items.append(conjunction())
        return items[0] if len(items) == 1 else ("OR", items)

    tree = disjunction()
    if peek() is not None:
        die(f"trailing {peek()!r} in {expr!r}")
    return canonical(tree)


def canonical(node):
    """Flatten nested operators of one kind, drop duplicates, sort operands."""
    if isinstance(node, str):
        return node
    op, items = node
    flat = []
    for item in map(canonical, items):
        if not isinstance(item, str) and item[0] == op:
            flat.extend(item[1])
        else:
            flat.append(item)
    uniq = sorted(set(flat), key=spdx_str)
    return uniq[0] if len(uniq) == 1 else (op, tuple(uniq))


def spdx_str(node, parent=None):
    if isinstance(node, str):
        return node
    op, items = node
    s = f" {op} ".join(spdx_str(i, op) for i in items)
    return f"({s})" if parent else s


def leaves(node):
    if isinstance(node, str):
        return {node}
    return set().union(*(leaves(i) for i in node[1]))


def dep5_leaf(leaf):
    name, _, exception = leaf.partition(" WITH ")
    name = DEP5_NAMES.get(name, name)
    if exception:
        name += f" with {DEP5_EXCEPTIONS.get(exception, exception)}"
    return name


def dep5_str(node):
    """DEP-5 syntax: "or"/"and", and ", and" where an "or" group is one
    operand of an "and" (DEP-5 has no parentheses)."""
    if isinstance(node, str):
        return dep5_leaf(node)
    op, items = node
    if op == "OR":
        parts = []
        for i in items:
            if not isinstance(i, str):
                die(f"cannot write {spdx_str(node)!r} in DEP-5 syntax")
            parts.append(dep5_leaf(i))
        return " or ".join(parts)
    simple = [dep5_leaf(i) for i in items if isinstance(i, str)]
    groups = [dep5_str(i) for i in items if not isinstance(i, str)]
    if len(groups) > 1 or any(not isinstance(i, str) and i[0] != "OR" for i in items):
        die(f"cannot write {spdx_str(node)!r} in DEP-5 syntax")
    return ", and ".join(groups + [" and ".join(simple)]) if groups else " and ".join(simple)


# ------------------------------------------------------------------ cargo


def cargo_metadata(vendor, platforms=()):
    cargo = os.environ.get("CARGO", "cargo")
    cmd = [cargo, "metadata", "--format-version", "1", "--manifest-path", str(ROOT / "Cargo.toml")]
    if vendor:
        cmd += [
            "--frozen",
            "--config", 'source.crates-io.replace-with="vendored-sources"',
            "--config", f'source.vendored-sources.directory="{vendor}"',
        ]
    else:
        cmd.append("--locked")
    for p in platforms:
        cmd += ["--filter-platform", p]
    try:
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        die(f"{' '.join(cmd[:3])} failed: {e}")
    return json.loads(out)


def linked_ids(meta):
    """Package ids linked into the binary, per the filtered resolve."""
    pkgs = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for dep in nodes[pid]["deps"]:
            if not any(k["kind"] is None for k in dep["dep_kinds"]):
                continue
            target = dep["pkg"]
            if any("proc-macro" in t["kind"] for t in pkgs[target]["targets"]):
                continue
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def copyright_lines(pkg):
    crate_dir = Path(pkg["manifest_path"]).parent
    lines = []
    for f in sorted(crate_dir.iterdir()):
        if not (f.is_file() and LICENSE_FILE.match(f.name)):
            continue
        for line in f.read_text(errors="replace").splitlines():
            m = COPYRIGHT_LINE.match(line)
            if not m:
                continue
            who = m.group(1).strip()
            who = re.sub(r"^(\(c\)|©)\s*", "", who, flags=re.I)
            who = re.sub(r"\s*All rights reserved\.?$", "", who, flags=re.I).strip()
            # Templates: "[yyyy] [name of copyright owner]", "{year}".
            if not who or who.startswith("[") or "{" in who:
                continue
            if who not in lines:
                lines.append(who)
    if lines:
        return lines, "holders as its licence files name them"
    authors = [a.strip() for a in pkg["authors"] if a.strip()]
    if authors:
        return authors, "its licence files name no holder; these are its Cargo.toml authors"
    return [f"the {pkg['name']} developers"], "the crate names no holder, neither in its licence files nor in its Cargo.toml"


def vendor_dir_name(pkg):
    return f"{pkg['name']}-{pkg['version']}"


def rpm_version(v):
    v = v.split("+", 1)[0]
    core, _, pre = v.partition("-")
    return f"{core}~{pre.replace('-', '_')}" if pre else core


# ------------------------------------------------------------------ output


def field(name, values):
    """A DEP-5 field, one value per line."""
    first, *rest = values
    return "\n".join([f"{name}: {first}"] + [f" {v}" for v in rest])


def license_paragraph(name):
    path = LICENSE_TEXTS / name.replace(" ", "-")
    if not path.is_file():
        die(f"no text for licence {name!r}: add {path.relative_to(ROOT)}")
    body = []
    for line in path.read_text().rstrip("\n").splitlines():
        body.append(f" {line.rstrip()}" if line.strip() else " .")
    return f"License: {name}\n" + "\n".join(body)


def make_copyright(all_pkgs, linked):
    paras = [
        "\n".join([
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/",
            "Upstream-Name: nodeherd",
            "Comment:",
            " Made by packaging/update-licenses.py from Cargo.lock and the crates",
            " themselves: do not edit by hand, run the script. vendor/ holds the Rust",
            " crates Cargo.lock names (the vendored-crates tarball,",
            " nodeherd_VERSION.orig-vendor.tar.xz); those marked \"linked\" are",
            " compiled into /usr/bin/nodeherd, the others are only needed to build",
            " (compiler plugins, build scripts), for tests, or on other systems.",
        ]),
        "\n".join(["Files: *", f"Copyright: {OWN_COPYRIGHT}", f"License: {dep5_str(spdx_parse(OWN_LICENSE))}"]),
    ]
    used = leaves(spdx_parse(OWN_LICENSE))
    for pkg in sorted(all_pkgs, key=lambda p: (p["name"], p["version"])):
        if not pkg.get("license"):
            die(f"crate {pkg['name']} {pkg['version']} declares no licence in its Cargo.toml")
        tree = spdx_parse(pkg["license"])
        used |= leaves(tree)
        holders, source = copyright_lines(pkg)
        role = "linked into /usr/bin/nodeherd" if pkg["id"] in linked else "not linked into the binary"
        paras.append("\n".join([
            f"Files: vendor/{vendor_dir_name(pkg)}/*",
            field("Copyright", holders),
            f"License: {dep5_str(tree)}",
            f"Comment: crate {pkg['name']} {pkg['version']}, {role}; {source}.",
        ]))
    paras.append("\n".join(["Files: debian/*", f"Copyright: {OWN_COPYRIGHT}", f"License: {dep5_str(spdx_parse(OWN_LICENSE))}"]))
    for name in sorted({dep5_leaf(leaf) for leaf in used}):
        paras.append(license_paragraph(name))
    return "\n\n".join(paras) + "\n"


def make_bundled(linked_pkgs):
    return "".join(
        f"{p['name']} {p['version']} {spdx_str(spdx_parse(p['license']))}\n"
        for p in sorted(linked_pkgs, key=lambda p: (p["name"], p["version"]))
    )


def make_spec_block(linked_pkgs):
    own = spdx_parse(OWN_LICENSE)
    terms = []
    for p in linked_pkgs:
        tree = spdx_parse(p["license"])
        for t in (tree[1] if not isinstance(tree, str) and tree[0] == "AND" else [tree]):
            if t != own and t not in terms:
                terms.append(t)
    terms.sort(key=spdx_str)
    expr = " AND ".join(spdx_str(t, "AND") for t in [own] + terms)
    lines = [
        "# BEGIN bundled crates: made by packaging/update-licenses.py; do not edit by hand.",
        "# nodeherd's own licence, then those of the crates linked into the binary",
        "# (packaging/bundled-crates.txt).",
        f"License:        {expr}",
    ]
    for p in sorted(linked_pkgs, key=lambda p: (p["name"], p["version"])):
        lines.append(f"Provides:       bundled(crate({p['name']})) = {rpm_version(p['version'])}")
    lines.append("# END bundled crates")
    return "\n".join(lines) + "\n"


def replace_block(text, block):
    m = re.search(r"^# BEGIN bundled crates.*?^# END bundled crates\n", text, re.S | re.M)
    if not m:
        die(f"{SPEC.relative_to(ROOT)} has no '# BEGIN bundled crates' ... '# END bundled crates' block")
    return text[: m.start()] + block + text[m.end():]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; fail when a file is out of date")
    ap.add_argument("--vendor", type=Path, help="the vendored crates (an unpacked vendor tarball's vendor/)")
    args = ap.parse_args()
    vendor = args.vendor.resolve() if args.vendor else None

    everything = cargo_metadata(vendor)
    all_pkgs = [p for p in everything["packages"] if p["source"]]
    if any(p["source"] is None for p in everything["packages"] if p["name"] != "nodeherd"):
        die("a path dependency other than nodeherd itself: this script does not know it")
    if vendor:
        dirs = {d.name for d in vendor.iterdir() if d.is_dir()}
        want = {vendor_dir_name(p) for p in all_pkgs}
        if dirs != want:
            die(f"{vendor} does not hold exactly Cargo.lock's crates: "
                f"extra {sorted(dirs - want)}, missing {sorted(want - dirs)}")
    linked = set()
    for target in LINUX_TARGETS:
        linked |= linked_ids(cargo_metadata(vendor, [target]))
    linked_pkgs = [p for p in all_pkgs if p["id"] in linked]

    outputs = {
        COPYRIGHT: make_copyright(all_pkgs, linked),
        SPEC: replace_block(SPEC.read_text(), make_spec_block(linked_pkgs)),
        BUNDLED: make_bundled(linked_pkgs),
    }
    stale = []
    for path, text in outputs.items():
        old = path.read_text() if path.exists() else ""
        if old == text:
            continue
        stale.append(path)
        rel = str(path.relative_to(ROOT))
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(
                old.splitlines(True), text.splitlines(True), f"{rel} (in the tree)", f"{rel} (from Cargo.lock)", n=1))
        else:
            path.write_text(text)
            print(f"wrote {rel}")
    if args.check and stale:
        print("out of date: " + ", ".join(str(p.relative_to(ROOT)) for p in stale)
              + "; run packaging/update-licenses.py", file=sys.stderr)
        sys.exit(1)
    if args.check:
        print(f"up to date: {len(all_pkgs)} crates vendored, {len(linked_pkgs)} linked into the binary")


if __name__ == "__main__":
    main()
