#!/usr/bin/env python3
"""check_layers.py — fails when an #include (or a plugin's name) crosses a boundary of
the architecture (docs/layout.md):

  core/<subsystem>  may include only the subsystems below it (LOWER, below), the public
                    headers (moontune/*.h) and, where listed, the backend interface;
  model, formats, store, text, plugin, base  know nothing of Lua (no Lua header);
  kernels/          include the public headers, backend.h and their own folder only;
  plugins/          include moontune/plugin.h, moontune/moontune.h and their own folder only;
  core/             names no concrete plugin in a string literal (tools/layers_allow.txt
                    lists the reviewed exceptions, each with its reason).

Usage: tools/check_layers.py [--root DIR]   (exit 1 and one line per violation)"""
import argparse
import os
import re
import sys

# What each core subsystem may include, besides itself and the public headers.
LOWER = {
    "base": [],
    "formats": ["base"],
    "text": ["base", "formats"],
    "plugin": ["base"],
    "dist": ["base"],
    "model": ["base", "formats", "text", "plugin", "dist", "backend"],
    "store": ["base", "formats", "text", "plugin", "dist", "model"],
    "lua": ["base", "formats", "text", "plugin", "dist", "model", "store", "backend"],
    "cli": ["base", "formats", "text", "plugin", "dist", "model", "store", "lua", "backend"],
}
NO_LUA = {"base", "formats", "text", "plugin", "dist", "model", "store"}
LUA_HEADERS = {"lua.h", "lauxlib.h", "lualib.h", "lua.hpp", "luaconf.h"}
PUBLIC = {"moontune/moontune.h", "moontune/plugin.h", "moontune/types.h"}

INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)
LITERAL = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
COMMENT = re.compile(r'/\*.*?\*/|//[^\n]*', re.S)


def sources(top, exts):
    for dirpath, _, names in os.walk(top):
        for name in sorted(names):
            if name.endswith(exts):
                yield os.path.join(dirpath, name)


def lines_of(text):
    """(line number, include kind, header) for every #include of a file."""
    for m in INCLUDE.finditer(text):
        yield text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2)


def check_core(root, problems):
    core = os.path.join(root, "core")
    for path in sources(core, (".c", ".h")):
        rel = os.path.relpath(path, root)
        parts = os.path.relpath(path, core).split(os.sep)
        if parts[0] == "include":
            sub = "include"
        elif len(parts) != 2 or parts[0] not in LOWER:
            problems.append(f"{rel}: core sources live in one of core/{{{','.join(LOWER)}}}/")
            continue
        else:
            sub = parts[0]
        text = open(path, encoding="utf-8").read()
        for line, kind, header in lines_of(text):
            where = f"{rel}:{line}"
            if kind == "<":
                if header in LUA_HEADERS and (sub in NO_LUA or sub == "include"):
                    problems.append(f"{where}: core/{sub} knows nothing of Lua, but includes <{header}>")
                continue
            if header in PUBLIC:
                continue
            if sub == "include":
                problems.append(f'{where}: a public header includes only public headers, not "{header}"')
                continue
            if "plugins/" in header:
                problems.append(f'{where}: the core never includes a plugin ("{header}")')
                continue
            target = "backend" if header == "backend.h" else header.split("/")[0]
            if "/" not in header and header != "backend.h":
                problems.append(f'{where}: core includes name their subsystem ("{sub}/{header}"?)')
            elif target == sub:
                continue
            elif target in ("cpu", "cuda"):
                problems.append(f'{where}: core/{sub} reaches a backend only through backend.h, not "{header}"')
            elif target not in LOWER and target != "backend":
                problems.append(f'{where}: "{header}" is no core subsystem\'s header')
            elif target not in LOWER[sub]:
                problems.append(f'{where}: core/{sub} may not include core/{target} ("{header}"); '
                                f'it may include {", ".join(LOWER[sub]) or "only the public headers"}')


def check_folder(root, top, allowed, what, problems):
    """kernels/ and plugins/: public headers, `allowed`, and files of the same folder."""
    for path in sources(os.path.join(root, top), (".c", ".h", ".cu", ".cuh")):
        rel = os.path.relpath(path, root)
        here = os.path.dirname(path)
        text = open(path, encoding="utf-8").read()
        for line, kind, header in lines_of(text):
            if kind == "<":
                if header in LUA_HEADERS:
                    problems.append(f"{rel}:{line}: {what} know nothing of Lua, but include <{header}>")
                continue
            if header in allowed or ("/" not in header and os.path.exists(os.path.join(here, header))):
                continue
            problems.append(f'{rel}:{line}: {what} include only {", ".join(sorted(allowed))} '
                            f'and their own folder, not "{header}"')


def plugin_names(root):
    names = set()
    for path in sources(os.path.join(root, "plugins"), (".c",)):
        text = open(path, encoding="utf-8").read()
        names.update(re.findall(r'\.name\s*=\s*"([^"]+)"', text))
        names.update(re.findall(r'#\s*define\s+NAME\s+"([^"]+)"', text))
    return names


def check_plugin_names(root, problems):
    allow = {}
    allow_path = os.path.join(root, "tools", "layers_allow.txt")
    if os.path.exists(allow_path):
        for raw in open(allow_path, encoding="utf-8"):
            raw = raw.split("#", 1)[0].strip()
            if raw:
                path, literal, reason = raw.split(None, 2)
                allow.setdefault((path, literal), reason)
    names = plugin_names(root)
    for path in sources(os.path.join(root, "core"), (".c", ".h")):
        rel = os.path.relpath(path, root)
        text = COMMENT.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)),
                           open(path, encoding="utf-8").read())
        for m in LITERAL.finditer(text):
            if m.group(1) in names and (rel, m.group(1)) not in allow:
                line = text.count("\n", 0, m.start()) + 1
                problems.append(f'{rel}:{line}: the core names the plugin "{m.group(1)}"; find plugins '
                                f'by kind and name at run time (or list a reviewed exception in '
                                f'tools/layers_allow.txt)')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    root = ap.parse_args().root
    problems = []
    check_core(root, problems)
    check_folder(root, "kernels", PUBLIC | {"backend.h"}, "kernels", problems)
    check_folder(root, "plugins", PUBLIC, "plugins", problems)
    check_plugin_names(root, problems)
    for p in problems:
        print(p)
    if problems:
        print(f"check_layers: {len(problems)} include(s) or name(s) cross a boundary (docs/layout.md)")
        return 1
    print("check_layers: every include keeps to the layout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
