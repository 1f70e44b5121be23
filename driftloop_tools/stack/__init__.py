"""The native stack: Kafka, Postgres, S3, MLflow, Airflow and Prometheus under supervisord."""
