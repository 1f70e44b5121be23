-- The retrain trigger's ledger: one row per drift episode, what was decided and the DAG run.

CREATE TABLE retrain_triggers (
    episode_id         text PRIMARY KEY,
    model_name         text NOT NULL,
    model_version      integer NOT NULL,
    dag_id             text NOT NULL,
    dag_run_id         text NOT NULL,
    state              text NOT NULL CHECK (
        state IN ('triggered', 'already_triggered', 'suppressed_cooldown', 'failed')
    ),
    reason             text,
    drift_share        double precision NOT NULL,
    event_id           uuid NOT NULL,
    window_end         timestamptz NOT NULL,
    -- When Airflow accepted the run (201 or 409); the per-model cooldown counts from here.
    triggered_at       timestamptz,
    dag_run_state      text,
    dag_run_started_at timestamptz,
    dag_run_ended_at   timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX retrain_triggers_cooldown
    ON retrain_triggers (model_name, triggered_at DESC)
    WHERE triggered_at IS NOT NULL;

-- The runs whose state the status refresh still follows.
CREATE INDEX retrain_triggers_open_runs
    ON retrain_triggers (updated_at)
    WHERE triggered_at IS NOT NULL
      AND (dag_run_state IS NULL OR dag_run_state NOT IN ('success', 'failed'));
