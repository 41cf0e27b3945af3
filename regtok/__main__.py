"""`python -m regtok`: the command line."""

from regtok.cli import main

main()
