"""Emptying the spool: routes, delivery workers, retries and bounces."""
