"""Who may use the balancer and how much: client keys (``keys.py``), their limits counted per window
(``limits.py``), the check every proxied request passes once (``gate.py``), and who may call the admin and
observability routes (``rules.py``).

Owns: the key table, per-key in-flight counts, the rate-limit headers, the 401/404/429 decisions.
May import: ``config``, ``counters``, ``errors``. Nothing here reads a request object of a web framework:
callers hand in header mappings and addresses.
"""
