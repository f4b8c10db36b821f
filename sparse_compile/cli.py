"""Command line: ``python -m sparse_compile show "<pattern>" ...`` and ``... demo [options]``.

``show`` prints a pattern's picture, density and block density (and draws it); ``demo`` runs the
main demonstration (``sparse_compile.demo``): a transformers Llama compiled with the sparse
backend, checked against the reference and timed against the dense model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sparse_compile.patterns import PatternError, parse


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sparse_compile",
                                 description="Inspect sparse attention patterns and run the demo.")
    sub = ap.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a pattern's picture, density and block density")
    show.add_argument("pattern", help='pattern text, e.g. "causal & sliding(64)"')
    show.add_argument("--length", type=int, default=512, help="query length (default 512)")
    show.add_argument("--keys", type=int, default=None, help="key length (default: --length)")
    show.add_argument("--block", type=int, default=128, help="block size (default 128)")
    show.add_argument("--width", type=int, default=64, help="picture width in characters")
    show.add_argument("-o", "--output", default=None, help="also draw a PNG to this path")
    sub.add_parser("demo", add_help=False,
                   help="compile a small transformers Llama with the sparse backend, check it "
                        "against the reference and time it (options: demo --help)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a bad pattern)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        from sparse_compile.demo import main as demo_main

        return demo_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        pattern = parse(args.pattern)
        lk = args.length if args.keys is None else args.keys
        from sparse_compile.patterns.picture import text_picture

        print(text_picture(pattern, args.length, lk, width=args.width,
                           block_m=args.block, block_n=args.block))
        if args.output:
            pattern.draw(args.output, args.length, lk, block_m=args.block)
            print(f"wrote {args.output}")
    except PatternError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
