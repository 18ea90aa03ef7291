"""The relay: a client's request to the chosen backend and its answer back, chunk by chunk.

Owns: the proxy (claim, open, relay, outcome: ``proxy.Proxy.forward``) and its two legs (``leg.py``):
the lean relay for the hot requests (``front.py`` the client connection's front and its hand-over to
aiohttp, ``lean.py`` the request, ``upstream.py`` the backend connections, ``stream.py`` the body socket
to socket, ``wire.py`` HTTP/1.1 on bytes, ``sweep.py`` the deadlines) and aiohttp's for the rest
(``connection.py`` the client's connection, head and body deadlines); the inbound body and its facts,
header rules, the first-byte deadlines, the usage chunk the balancer asks for and cuts, and the access
record.
May import: ``scheduling``, ``fleet``, ``config``, ``errors``.
"""
