"""The native stack: Kafka, PostgreSQL, an S3 server, MLflow, Airflow and Prometheus under supervisord."""
