"""Runs: lifecycle states, the scheduler, and the executor that takes one run end to end."""
