"""The supervisor: the inference servers the balancer launches itself, and the llama-server build.

Owns: launched processes (start, readiness, restart with backoff, drain and stop), their output logs,
the child-process set-up (own session, parent-death signal), and the rig that builds llama-server.
May import: ``fleet`` (to register its instances), ``config``, ``service``.
"""
