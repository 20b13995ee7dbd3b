"""`python -m cmcseg` is the `cmcseg` command."""
from cmcseg.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
