"""``python -m attnmerge``: the same command line as the ``attnmerge`` script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
