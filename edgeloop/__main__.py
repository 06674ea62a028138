"""``python -m edgeloop ...``: the same command line as the ``edgeloop`` script (see edgeloop/cli.py).

Handy where the console script is not on PATH, and for measuring the agent's start-up with the
interpreter's own flags, e.g. ``python -X importtime -m edgeloop agent --config FILE``.
"""

from edgeloop.cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="edgeloop")
