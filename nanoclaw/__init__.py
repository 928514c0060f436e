"""NanoClaw: a personal Claude assistant host.

Chat channels in, one sandboxed agent per conversation, every hand-off a row in SQLite.
"""

__version__ = "0.1.0"
