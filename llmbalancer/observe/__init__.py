"""Observation: what the balancer tells about itself.

Owns: Prometheus metrics, the recent-requests ring, the snapshot the monitor reads, structured logging
set-up, and the local GPU sampler behind ``/llmhealth``.
May import: every domain package below it (``relay``, ``supervisor``, ``scheduling``, ``fleet``, ``config``);
nothing above (``web``, ``app``).
"""
