#!/bin/sh
# Entrypoint of the Airflow containers: `airflow-entrypoint <airflow subcommand> [args]`.
# SimpleAuthManager takes its users from AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS but their
# passwords only from a JSON file; writing that file from AIRFLOW_API_USERNAME/PASSWORD keeps
# one source (.env) for the api-server and for retrain-trigger, the REST client that logs in.
set -eu

python - <<'PY'
import json
import os
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
path.parent.mkdir(parents=True, exist_ok=True)
path.touch(mode=0o600)
user = os.environ.get("AIRFLOW_API_USERNAME", "driftloop")
path.write_text(json.dumps({user: os.environ["AIRFLOW_API_PASSWORD"]}) + "\n")
PY

exec airflow "$@"
