"""Retraining orchestrated: the Airflow REST client and the trigger's ledger."""
