"""Workloads of the research bench (`hybridmig bench`); see base.py."""
