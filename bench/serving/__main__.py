"""`python -m bench.serving`: see `runner.py` for the options."""

import sys

if __name__ == "__main__":  # the guard keeps spawned load processes from importing the runner
    from bench.serving.runner import main

    sys.exit(main())
