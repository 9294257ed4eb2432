"""`python -m gpt2.hf_export`: a run's model as a complete Hugging Face folder, and the hub upload.

    python -m gpt2.hf_export --init outputs/2026-11-25/10-00-00_flash --out gpt2-flash
    python -m gpt2.hf_export --init RUN --out gpt2-flash --force --push-to-hub me/gpt2-flash

What the folder holds and how it is written: gpt2/runs/hf_folder.py.
"""

import argparse
import sys

from gpt2.errors import command
from gpt2.runs.hf_folder import export, push_to_hub


@command(interrupted="interrupted: the export stopped; --out was left as it was")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpt2.hf_export", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:4]))
    p.add_argument("--init", required=True, help="a run folder or a checkpoint file (or a transformers GPT-2)")
    p.add_argument("--out", required=True, help="the folder to write (refused if it exists and is not empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--push-to-hub", metavar="REPO", help="then upload the folder to this hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    args = p.parse_args(argv)
    out = export(args.init, args.out, args.force, repo_id=args.push_to_hub)
    print(f"wrote {out}: " + ", ".join(sorted(f.name for f in out.iterdir())))
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub, args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
