"""Cutover: fence the source, hand over at one LSN (handoff.py), verify and cleanup."""
