-- Prediction log and labels: the lineage rows the drift monitor and the training DAG read.
-- Idempotency key: request_id (a replayed Kafka batch inserts nothing).

CREATE TABLE prediction_log (
    request_id    text PRIMARY KEY,
    event_id      uuid NOT NULL,
    predicted_at  timestamptz NOT NULL,
    model_name    text NOT NULL,
    model_version integer NOT NULL,
    run_id        text NOT NULL,
    features      jsonb NOT NULL,
    prediction    double precision NOT NULL,
    latency_ms    double precision NOT NULL,
    source        text NOT NULL CHECK (source IN ('http', 'batch')),
    -- The predictions record that logged the row first: the one exported to Parquet.
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    logged_at     timestamptz NOT NULL DEFAULT now()
);

-- Drift windows and training extracts: a time range of one model version (or of all versions).
CREATE INDEX prediction_log_model_version_time
    ON prediction_log (model_name, model_version, predicted_at);
CREATE INDEX prediction_log_model_time ON prediction_log (model_name, predicted_at);

-- One label per prediction; the join with prediction_log is on both primary keys.
CREATE TABLE labels (
    request_id  text PRIMARY KEY REFERENCES prediction_log (request_id) ON DELETE CASCADE,
    label       double precision NOT NULL,
    observed_at timestamptz NOT NULL,
    event_id    uuid NOT NULL,
    logged_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX labels_observed_at ON labels (observed_at);

-- Labels whose prediction has not arrived yet; moved to labels when it does, deleted after the
-- feature logger's retention (FEATURE_LOGGER_PENDING_LABEL_RETENTION_HOURS, default 7 days).
CREATE TABLE pending_labels (
    request_id  text PRIMARY KEY,
    label       double precision NOT NULL,
    observed_at timestamptz NOT NULL,
    event_id    uuid NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX pending_labels_received_at ON pending_labels (received_at);
