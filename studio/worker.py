"""``python -m studio.worker``: start a GPU worker (studio.jobs.worker) on the configured queue."""

import sys

if __name__ == "__main__":
    from studio.jobs.worker import main

    sys.exit(main())
