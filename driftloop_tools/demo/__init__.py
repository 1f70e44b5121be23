"""The demo: the seed data replayed through the gateway, the closed loop watched."""
