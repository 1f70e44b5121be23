#!/usr/bin/env bash
# Runs once, when the Postgres volume is first initialised (docker-entrypoint-initdb.d).
# The image creates POSTGRES_DB (driftloop); MLflow and Airflow keep their metadata in
# databases of their own beside it, owned by the same user.
# No `set -u`: the image may source this file into its own entrypoint shell.
set -eo pipefail

for database in mlflow airflow; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=database="$database" --set=owner="$POSTGRES_USER" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'owner')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database')\gexec
SQL
done
