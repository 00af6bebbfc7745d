"""Run the parity tests and print the max-abs error per module (the README's parity table).

Usage: ``.venv/bin/python -m tests.parity_report [--full] [--log PATH] [pytest args, e.g. -m 'not fullsize']``.

Every parity assertion in the suite goes through ``tests.conftest.max_abs``, which appends one JSON line per
comparison to ``$JAXDIFF_PARITY_LOG``. The default table has one row per test function (the worst comparison
over its parametrisations and quantities); ``--full`` prints every (test, quantity). ``--log PATH`` reads an
existing log instead of running the suite.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile


def run_suite(pytest_args: list[str], log: str) -> int:
    env = {**os.environ, "JAXDIFF_PARITY_LOG": log}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", *pytest_args],
                           env=env)


def worst_by(rows: list[dict], key) -> "collections.OrderedDict":
    by: collections.OrderedDict = collections.OrderedDict()
    for r in rows:
        k = key(r)
        prev = by.get(k)
        n = (prev["n"] if prev else 0) + 1
        if prev is None or r["max_abs"] > prev["max_abs"]:
            by[k] = dict(r, n=n)
        else:
            prev["n"] = n
    return by


def table(rows: list[dict], full: bool) -> str:
    def parts(r):
        test = r["test"].split("::")
        return test[0].removeprefix("tests/"), test[-1]

    out = []
    if full:
        out += ["| test file | test | quantity | max-abs error | ref std | shape |", "|---|---|---|---|---|---|"]
        for (f, t, w), r in worst_by(rows, lambda r: (*parts(r), r["what"])).items():
            out.append(f"| {f} | {t} | {w or '-'} | {r['max_abs']:.2e} | {r['ref_std']:.3g} | {tuple(r['shape'])} |")
    else:
        out += ["| test file | test (all parametrisations) | comparisons | worst max-abs error | at | ref std there |",
                "|---|---|---|---|---|---|"]
        for (f, t), r in worst_by(rows, lambda r: (parts(r)[0], parts(r)[1].split("[")[0])).items():
            out.append(f"| {f} | {t} | {r['n']} | {r['max_abs']:.2e} | {r['what'] or '-'} | {r['ref_std']:.3g} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.parity_report")
    ap.add_argument("--full", action="store_true", help="one row per (test, quantity)")
    ap.add_argument("--log", help="read this JAXDIFF_PARITY_LOG instead of running the suite")
    args, pytest_args = ap.parse_known_args(argv)
    rc = 0
    with tempfile.TemporaryDirectory() as d:
        log = args.log or os.path.join(d, "parity.jsonl")
        if not args.log:
            rc = run_suite(pytest_args, log)
        rows = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    if not rows:
        print("no parity comparisons were logged", file=sys.stderr)
        return rc or 1
    print()
    print(table(rows, args.full))
    return rc


if __name__ == "__main__":
    sys.exit(main())
