"""Airflow: score yesterday's customers every night with `inferplane batch` (docs/batch.md).

Copy into your Airflow `dags/` folder; the worker needs `pip install 'inferplane[batch,s3]'`.
A retry of the same DAG run reuses its --output and --job-id, so it resumes after the input files
already committed. Exit code 2 (a usage or configuration error) is not worth a retry, so the task
fails at once on it; 1 (too many bad rows) and 3 (model or storage unavailable) are retried.
"""

from __future__ import annotations

import datetime

from airflow import DAG
from airflow.exceptions import AirflowFailException
from airflow.operators.python import PythonOperator


def score(ds: str, run_id: str, **_: object) -> None:
    import subprocess

    done = subprocess.run(
        [
            "inferplane", "batch",
            "--input", "s3://lake/customers/",
            "--output", f"s3://lake/scores/{ds}/",
            "--service", "propensity",
            "--repository", "s3://lake/models",
            "--id-column", "customer_id",
            "--job-id", f"propensity-{ds}",
            "--max-error-rate", "0.001",
        ],
        check=False,
    )  # fmt: skip
    if done.returncode == 2:
        raise AirflowFailException(f"inferplane batch: usage or configuration error ({run_id})")
    if done.returncode != 0:
        raise RuntimeError(f"inferplane batch exited with {done.returncode}; retrying resumes it")


with DAG(
    dag_id="propensity_scores",
    schedule="30 1 * * *",
    start_date=datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC),
    catchup=False,
    max_active_runs=1,  # never two runs writing the same output
    default_args={"retries": 3, "retry_delay": datetime.timedelta(minutes=10)},
) as dag:
    PythonOperator(
        task_id="score_customers",
        python_callable=score,
        execution_timeout=datetime.timedelta(hours=6),
    )
