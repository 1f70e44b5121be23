"""Operator tooling: the ``driftloop`` CLI, the demo and the native stack.

Nothing in the runtime (``driftloop``, ``gateway``, ``consumers``, ``dags``) imports it."""
