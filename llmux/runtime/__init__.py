"""Carrying out the core's commands with trio: backend drivers (shell hooks), the hook registry,
timers, the fleet of groups, the state folder, one instance per config and port, systemd."""
