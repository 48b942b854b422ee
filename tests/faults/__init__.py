"""Fault tests of issue #5, "Never lose an event": real receiver processes, real signals,
real brokers, and a sender that retries like DT. Each test reports sent, answered 200,
stored, duplicates stored and lost; lost must be 0."""
