-- The drift monitor: one row per window it judged (or refused), and its episode state per model.

CREATE TABLE drift_runs (
    model_name       text NOT NULL,
    model_version    integer NOT NULL,
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    outcome          text NOT NULL CHECK (outcome IN ('drifted', 'clean', 'refused')),
    window_rows      integer NOT NULL,
    reference_rows   integer NOT NULL,
    labelled_rows    integer NOT NULL DEFAULT 0,
    drift_share      double precision,
    drifted_features text[] NOT NULL DEFAULT '{}',
    prediction_score double precision,
    -- Per monitored feature: score, threshold, stat test, drifted (the assessment's features).
    feature_scores   jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- Quality metrics on the labelled rows (rmse, mae, ...); null below the minimum of labels.
    quality          jsonb,
    refusal_reason   text,
    report_uri       text,
    -- The open episode after this window, and whether DriftDetected was published for it.
    episode_id       text,
    drift_holds      boolean NOT NULL DEFAULT false,
    event_id         uuid,
    check_seconds    double precision NOT NULL,
    checked_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, model_version, window_end)
);

CREATE INDEX drift_runs_checked_at ON drift_runs (model_name, checked_at DESC);

-- The episode state machine of each monitored model (driftloop.drift.episodes.EpisodeState),
-- written in the same transaction as the window's drift_runs row.
CREATE TABLE drift_monitor_state (
    model_name text PRIMARY KEY,
    state      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
