"""``python tests/paused_cli.py SECONDS <safetypairs CLI args>``: the CLI, sleeping SECONDS after each chunk it writes.

A test hook for kill tests, kept out of the library: the test waits for the first chunk's done-marker and kills the
process while it sleeps, so the kill lands after exactly one chunk on a machine of any speed (a run whose chunks
take milliseconds would otherwise finish a second chunk between the marker appearing and the signal).
"""

from __future__ import annotations

import sys
import time

from safetypairs.cli import main
from safetypairs.engine import runner


def pause_after_each_chunk(seconds: float) -> None:
    """Make the runner sleep ``seconds`` after writing each chunk (its parquet and its done-marker)."""
    write_chunk = runner._run_chunk

    def paused(*args, **kwargs) -> None:
        write_chunk(*args, **kwargs)
        time.sleep(seconds)

    runner._run_chunk = paused


if __name__ == "__main__":
    pause_after_each_chunk(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
