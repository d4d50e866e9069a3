"""Convergence: the session (desired state, store, backends), observation, and the executor, the
only code that changes a backend."""
