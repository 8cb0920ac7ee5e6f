"""`python -m prefixserve`: the same command as `prefixserve`."""

from prefixserve.cli import main

main()
