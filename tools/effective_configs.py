#!/usr/bin/env python
"""Every config under configs/ as its effective config, key by key, to compare two commits.

    python tools/effective_configs.py dump OUT.json          # in a checkout of one commit
    python tools/effective_configs.py compare OLD.json NEW.json

``compare`` prints each key whose value differs, each key one side lacks, and exits 1 on a
difference in a config both sides have (keys only the new side has are listed as new keys).
Run ``dump`` with the checkout's own package first on the path (``PYTHONPATH=<checkout>``).
"""
import argparse
import glob
import json
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def dump(out: str) -> int:
    sys.path.insert(0, ROOT)
    from torchreid_ext.config import flat_keys, load_config
    from torchreid_ext.options import config_value

    found = {}
    for path in sorted(glob.glob(osp.join(ROOT, "configs", "**", "*.yaml"), recursive=True)):
        cfg = load_config(path, validate=False)
        values = {}
        for key in flat_keys(cfg):
            value = config_value(cfg, key)
            values[key] = list(value) if isinstance(value, (list, tuple)) else value
        found[osp.relpath(path, ROOT)] = values
    with open(out, "w") as f:
        json.dump(found, f, indent=0, sort_keys=True, default=str)
    print(f"{len(found)} configs -> {out}")
    return 0


def compare(old_path: str, new_path: str) -> int:
    old, new = json.load(open(old_path)), json.load(open(new_path))
    differ, new_keys = False, set()
    for name in sorted(set(old) | set(new)):
        if name not in new:
            print(f"{name}: only in {old_path}")
            continue
        if name not in old:
            print(f"{name}: new config")
            continue
        for key in sorted(set(old[name]) | set(new[name])):
            if key not in old[name]:
                new_keys.add(key)
            elif key not in new[name]:
                differ = True
                print(f"{name}: {key} removed")
            elif old[name][key] != new[name][key]:
                differ = True
                print(f"{name}: {key} {old[name][key]!r} -> {new[name][key]!r}")
    print(f"new keys: {sorted(new_keys)}")
    print("effective configs differ" if differ else f"{len(set(old) & set(new))} configs identical key by key")
    return 1 if differ else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("dump").add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("old")
    c.add_argument("new")
    args = p.parse_args(argv)
    return dump(args.out) if args.cmd == "dump" else compare(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
