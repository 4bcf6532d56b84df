"""`python -m bench [--quick|--full] [--out DIR] [--only SECTION ...]`; see bench/__init__.py."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from bench.runner import run
from bench.settings import PROFILES, SECTIONS
from bipe.config import NAMED_ENCODINGS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="small shape, seq 512, lengths up to 8k, contexts 1k/4k (default)")
    mode.add_argument("--full", dest="profile", action="store_const", const="full",
                      help="everything: also the 162M shape, seq 1024, lengths up to 32k, "
                           "context 16k, BiPE in the long-context section")
    mode.add_argument("--smoke", dest="profile", action="store_const", const="smoke",
                      help="tiny shapes, one sample each (checks that every section runs)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default outputs/bench/<timestamp>)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, metavar="SECTION", default=None,
                   help=f"run only these sections: {', '.join(SECTIONS)}")
    p.add_argument("--lengths", nargs="+", type=int, default=None, metavar="TOKENS",
                   help="long-context lengths in tokens, instead of the profile's (e.g. "
                        "--quick --lengths 2048 8192 32768)")
    p.add_argument("--encodings", nargs="+", default=None, metavar="PE",
                   help="long-context encodings, instead of every named one (e.g. "
                        "--encodings rope alibi t5)")
    p.set_defaults(profile="quick")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path("outputs") / "bench" / time.strftime("%Y-%m-%d_%H-%M-%S")
    command = "python -m bench " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    profile = PROFILES[args.profile]
    if args.lengths:
        if min(args.lengths) < 1:
            raise SystemExit("python -m bench: error: --lengths must be positive token counts")
        profile = profile.replace(lc_lengths=tuple(sorted(set(args.lengths))))
    if args.encodings:
        unknown = sorted(set(args.encodings) - set(NAMED_ENCODINGS))
        if unknown:
            raise SystemExit(f"python -m bench: error: --encodings {' '.join(unknown)}: not a "
                             f"named encoding; choose from {', '.join(NAMED_ENCODINGS)}")
        profile = profile.replace(lc_encodings=tuple(args.encodings))
    md_path, json_path, md = run(profile, out, args.only or SECTIONS,
                                 command=command.strip(),
                                 echo=lambda s: print(s, file=sys.stderr, flush=True))
    print(md)
    print(f"[bench] wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
