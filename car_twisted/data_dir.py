"""Where the daemon keeps its runs and secrets, for the daemon and the CLI alike."""

import os


def default_data_dir(environ=os.environ) -> str:
    """C{$CAR_HOME}, else C{~/.car}."""
    return environ.get("CAR_HOME") or os.path.expanduser("~/.car")
