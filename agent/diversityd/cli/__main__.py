"""`python -m diversityd.cli`: what the installed units run (ExecReload=, the tests)."""

from diversityd.cli.app import main

main()
