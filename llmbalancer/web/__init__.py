"""The balancer's own HTTP routes (everything else is proxied)."""
