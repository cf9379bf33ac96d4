"""Drivers for the demo, the tests and the bench: the memwork workload and
two network-namespace "hosts"."""
