"""``python -m studio.evaluate``: the paper's evaluation protocol (studio.styles.evaluate)."""

import sys

if __name__ == "__main__":
    from studio.styles.evaluate import main

    sys.exit(main())
