"""``python -m train.concepts_merge OUT TABLE [TABLE ...]``: join concept tables of one method and model (e.g. the
``colour`` group and the ``safety`` group, trained separately by :mod:`train.concepts`) into one table ``OUT``.

    python -m train.concepts_merge jaxdiff/assets/concepts/sdisc runs/concepts/sdisc runs/concepts/sdisc_safety
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.concepts_merge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the merged table (NAME or NAME.json)")
    ap.add_argument("tables", nargs="+", help="tables to join, in order")
    args = ap.parse_args(argv)
    from jaxdiff.steer.concepts import ConceptTableError, load_table, merge_tables, save_table
    try:
        merged = merge_tables(*[load_table(t) for t in args.tables])
    except ConceptTableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st, js = save_table(args.out, merged)
    print(f"wrote {st} and {js}: {', '.join(f'{g} ({len(m)})' for g, m in merged.groups.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
