"""`python -m gpt2.report`: the speed-up report from sweep or run folders (the rules: gpt2/reporting/build.py).

    python -m gpt2.report multirun/2026-11-25/10-00-00 [more folders] [--out DIR]

writes report.md, report.csv and report.png into the first folder (or --out); the same runs give
byte-identical files.
"""

import argparse
import sys

from gpt2.errors import command
from gpt2.reporting.build import build_report


@command()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2.report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", metavar="DIR", help="a sweep folder or a single run folder")
    parser.add_argument("--out", metavar="DIR", help="where to write the report (default: the first DIR)")
    args = parser.parse_args(argv)
    paths = build_report(args.folders, args.out)
    for p in paths.values():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
