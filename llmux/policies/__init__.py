"""Switch policies: the interface, the built-in FIFO and cost-aware policies, and the loader of
custom ones. `llmux.policy` re-exports all of it for policy authors."""
