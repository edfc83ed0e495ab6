"""`python -m diversityd.daemon`: what the installed diversityd.service runs."""

from diversityd.daemon.app import main

main()
