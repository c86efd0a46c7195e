"""The `loupe` command line. Each subcommand lives in its own module (``cli/cmd_*.py``)."""
