"""Scheduling: which backend takes a request, and when.

Owns: the dispatcher (select, then claim, else queue), the admission queue, model routing, racing,
and the routing policies (``selectors/``, one file each).
May import: ``fleet``, ``config``, ``errors``. Nothing here touches HTTP bodies or sockets.
"""
