#!/usr/bin/env bash
# Creates MLflow's own role and database beside Airflow's metadata database.
# The postgres image runs this once, on an empty data volume (docker-entrypoint-initdb.d).
# psql variables (:"name" / :'value') quote the identifiers and the password safely.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v mlflow_db="${MLFLOW_DB_NAME:-mlflow}" \
    -v mlflow_user="${MLFLOW_DB_USER:-mlflow}" \
    -v mlflow_password="${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set}" <<'EOSQL'
CREATE ROLE :"mlflow_user" WITH LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_user";
GRANT ALL PRIVILEGES ON DATABASE :"mlflow_db" TO :"mlflow_user";
EOSQL
