"""``python -m apecli``: the command line."""

from apecli.cli import main

main()
