"""Alert notifications: the webhook receiver the platform runs, its durable log and its CLI."""
