"""Run the parity tests and print the max-abs error per module (the README's parity table).

Usage: ``.venv/bin/python -m tests.parity_report [-m 'not fullsize']`` (extra args go to pytest)."""

import collections
import json
import os
import subprocess
import sys
import tempfile


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "parity.jsonl")
        env = {**os.environ, "JAXDIFF_PARITY_LOG": log}
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", *argv],
                             env=env)
        rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    by = collections.OrderedDict()
    for r in rows:
        key = (r["test"].split("::")[0].removeprefix("tests/"), r["test"].split("::")[-1], r["what"])
        prev = by.get(key)
        if prev is None or r["max_abs"] > prev["max_abs"]:
            by[key] = r
    print("\n| test file | test | quantity | max-abs error | ref std | shape |")
    print("|---|---|---|---|---|---|")
    for (f, t, w), r in by.items():
        print(f"| {f} | {t} | {w or '-'} | {r['max_abs']:.2e} | {r['ref_std']:.3g} | {tuple(r['shape'])} |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
