"""`python -m fedmoe <command> ...` = the `fedmoe` console script (fedmoe/cli.py)."""

import sys

from fedmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
