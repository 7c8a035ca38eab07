"""The simulator: the live switching core on a virtual clock, replaying traces against policies."""
