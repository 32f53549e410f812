"""`python -m bench.reliability`: see `runner.py` for the options."""

import sys

if __name__ == "__main__":  # the guard keeps the load process (spawned) from importing the runner
    from bench.reliability.runner import main

    sys.exit(main())
