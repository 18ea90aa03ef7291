"""The relay: a client's request to the chosen backend and its answer back, chunk by chunk.

Owns: the proxy (claim, open, relay, outcome), the client's connection (head and body deadlines), the
inbound body and its facts, header rules, the first-byte deadlines, the usage chunk the balancer asks for
and cuts, and the access record.
May import: ``scheduling``, ``fleet``, ``config``, ``errors``.
"""
