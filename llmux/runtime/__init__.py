"""Carrying out the core's commands with trio: hooks as subprocesses, timers, waiting requests."""
