"""`python -m app <command> [KEY=value ...]`: the command line lives in app.cli.main."""
import sys

from app.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
