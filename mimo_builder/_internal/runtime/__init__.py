"""Executing a built graph: batch checks, cross-rank bridge, forward/backward schedule, optimizer step."""
