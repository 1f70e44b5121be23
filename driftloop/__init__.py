"""The runtime core every driftloop deployable shares, one subpackage per concern.

``events`` (Kafka), ``serving`` (the scoring core and the champion), ``storage`` (Postgres and
Parquet), ``drift``, ``training`` and ``orchestration`` (Airflow), over settings, connection
retries and leader election here. It imports only ``schemas`` below it: the deployables
(``gateway``, ``consumers``, ``dags``) and the tooling (``driftloop_tools``) import it, never the
reverse (checked by import-linter's contracts in ``pyproject.toml``).
"""
