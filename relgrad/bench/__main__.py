"""``python -m relgrad.bench``: see :mod:`relgrad.bench.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
