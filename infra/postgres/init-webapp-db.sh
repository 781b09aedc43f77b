#!/usr/bin/env bash
# Creates the web app's role and database (accounts: serving.webapp.accounts) beside Airflow's
# and MLflow's. The postgres image runs this once, on an empty data volume
# (docker-entrypoint-initdb.d). psql variables (:"name" / :'value') quote safely.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v webapp_db="${WEBAPP_DB_NAME:-leukoflow_webapp}" \
    -v webapp_user="${WEBAPP_DB_USER:-leukoflow_webapp}" \
    -v webapp_password="${WEBAPP_DB_PASSWORD:?WEBAPP_DB_PASSWORD must be set}" <<'EOSQL'
CREATE ROLE :"webapp_user" WITH LOGIN PASSWORD :'webapp_password';
CREATE DATABASE :"webapp_db" OWNER :"webapp_user";
GRANT ALL PRIVILEGES ON DATABASE :"webapp_db" TO :"webapp_user";
EOSQL
