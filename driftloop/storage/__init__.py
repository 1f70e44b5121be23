"""Where traffic lands: Postgres (migrations, prediction log) and Parquet in S3."""
