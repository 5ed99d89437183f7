"""`python -m cellserver` is the `cellserver` command."""

from cellserver.cli import main

main()
