"""The switching core: the rules of a group of models as plain code (no I/O), and its vocabulary.

`group.GroupCore` takes `events` and returns `commands`; `runtime.driver` carries the commands out
with trio, subprocesses and HTTP, and `sim.simulator` carries them out on a virtual clock.
"""
