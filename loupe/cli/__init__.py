"""The ``loupe`` command line: ``main.py`` dispatches to one module per subcommand (``cmd_*.py``)."""
