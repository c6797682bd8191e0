"""Write the synthetic style set for the tiny backbone (studio.styles.synthetic_styles) into a folder.

    .venv/bin/python scripts/make_tiny_styles.py OUT_FOLDER [--seed N]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, without installing

from studio.styles.synthetic_styles import STYLES, write_style_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (one sub-folder per style)")
    parser.add_argument("--seed", type=int, default=1616, help="drawing seed (default 1616)")
    args = parser.parse_args(argv)
    folders = write_style_set(args.out, args.seed)
    print(f"{len(folders)} styles in {args.out}: {', '.join(s.name for s in STYLES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
