"""Experiments built on the library (never imported by the core): the demo and the studies."""
