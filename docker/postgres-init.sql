-- The databases of the production stack, run once on an empty cluster as the stack's role:
-- by the postgres image (mounted into /docker-entrypoint-initdb.d/) in docker/compose.yaml,
-- and by `python docker/stack.py up` (psql -f) natively.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
-- Prefect's migrations create pg_trgm themselves, which needs a superuser; creating it here
-- lets the Prefect server run as a role without that right.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
