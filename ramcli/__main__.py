"""`python -m ramcli` (and `torchrun -m ramcli`) entry point."""

from ramcli.cli.app import main

main()
