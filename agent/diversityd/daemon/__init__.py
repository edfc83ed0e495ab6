"""diversityd, the daemon: one state loop (loop.py) and the services around it.

See DESIGN.md beside the package for the layers and the path of one event.
"""
