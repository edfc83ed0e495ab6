"""diversityctl, the command line: app.py is the group and its entry point; each command
module is imported only when its command runs (`status` stays fast)."""
