"""The fleet: the backends the balancer knows, their state, and how that state is learnt.

Owns: ``Backend`` records and the ``Registry`` (membership, state, claims, change notification), the
health probes and poller, the circuit breaker, slot capacity, and token usage as backends report it.
May import: ``config``, ``errors``, ``service``. Nothing here knows of requests being scheduled or relayed.
"""
