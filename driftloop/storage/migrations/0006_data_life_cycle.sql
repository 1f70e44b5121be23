-- The bounded hot store (issue 18): prediction_log and labels become native declarative range
-- partitions by prediction time, one per UTC day, named <table>_pYYYYMMDD. A label lives in the
-- partition of its prediction's day (labels.predicted_at is the prediction's), so one day of
-- both tables is dropped together once it has left every model's hot retention
-- (driftloop.storage.hot_store; run by the feature-logger and `driftloop storage maintain`).
--
-- Uniqueness of request_id: Postgres only enforces a unique index that contains the partition
-- key, so the primary keys are (request_id, predicted_at). A replayed Kafka record carries its
-- event's own timestamp, so it meets its first copy on that key (ON CONFLICT DO NOTHING). A
-- different event reusing a request id (a client retrying with the same X-Request-ID) has
-- another timestamp: the writer refuses it with an anti-join on request_id over every live
-- partition (the primary key's index leads with request_id), serialised per Kafka partition
-- with an advisory lock; the predictions topic is keyed by request id, so both events are on
-- the same partition (driftloop.storage.prediction_log).
--
-- The old tables are converted in place: one partition per day holding rows, the rows copied,
-- the old tables dropped. The foreign key from labels goes: a day of labels is dropped with
-- its day of predictions, and labels are only ever inserted by joining their prediction.

CREATE TABLE prediction_log_partitioned (
    request_id    text NOT NULL,
    event_id      uuid NOT NULL,
    predicted_at  timestamptz NOT NULL,
    model_name    text NOT NULL,
    model_version integer NOT NULL,
    run_id        text NOT NULL,
    features      jsonb NOT NULL,
    prediction    double precision NOT NULL,
    latency_ms    double precision NOT NULL,
    source        text NOT NULL CHECK (source IN ('http', 'batch')),
    kafka_partition integer NOT NULL,
    kafka_offset    bigint NOT NULL,
    logged_at     timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (predicted_at);

CREATE TABLE labels_partitioned (
    request_id   text NOT NULL,
    predicted_at timestamptz NOT NULL,
    label        double precision NOT NULL,
    observed_at  timestamptz NOT NULL,
    event_id     uuid NOT NULL,
    logged_at    timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (predicted_at);

DO $$
DECLARE
    day date;
BEGIN
    FOR day IN
        SELECT DISTINCT (predicted_at AT TIME ZONE 'UTC')::date FROM prediction_log ORDER BY 1
    LOOP
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF prediction_log_partitioned FOR VALUES FROM (%L) TO (%L)',
            'prediction_log_p' || to_char(day, 'YYYYMMDD'),
            day::timestamp AT TIME ZONE 'UTC',
            (day + 1)::timestamp AT TIME ZONE 'UTC'
        );
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF labels_partitioned FOR VALUES FROM (%L) TO (%L)',
            'labels_p' || to_char(day, 'YYYYMMDD'),
            day::timestamp AT TIME ZONE 'UTC',
            (day + 1)::timestamp AT TIME ZONE 'UTC'
        );
    END LOOP;
END
$$;

INSERT INTO prediction_log_partitioned SELECT
    request_id, event_id, predicted_at, model_name, model_version, run_id, features, prediction,
    latency_ms, source, kafka_partition, kafka_offset, logged_at
FROM prediction_log;

INSERT INTO labels_partitioned SELECT
    l.request_id, p.predicted_at, l.label, l.observed_at, l.event_id, l.logged_at
FROM labels l JOIN prediction_log p USING (request_id);

DROP TABLE labels;
DROP TABLE prediction_log;
ALTER TABLE prediction_log_partitioned RENAME TO prediction_log;
ALTER TABLE labels_partitioned RENAME TO labels;

ALTER TABLE prediction_log ADD PRIMARY KEY (request_id, predicted_at);
CREATE INDEX prediction_log_model_version_time
    ON prediction_log (model_name, model_version, predicted_at);
CREATE INDEX prediction_log_model_time ON prediction_log (model_name, predicted_at);

ALTER TABLE labels ADD PRIMARY KEY (request_id, predicted_at);
CREATE INDEX labels_observed_at ON labels (observed_at);

-- Parquet compaction (driftloop.storage.compaction): objects of the store that are in no manifest and
-- must go. A compaction records its new file here before putting it (a crash leaves it
-- listed), and its swap of the manifest, in one transaction, removes that entry and lists the
-- files it replaced; files past the model's Parquet retention are listed as expired. The next
-- compaction run deletes every listed object, then its entry.
CREATE TABLE feature_garbage (
    object_key text PRIMARY KEY,
    reason     text NOT NULL CHECK (reason IN ('unfinished_compaction', 'replaced', 'expired')),
    listed_at  timestamptz NOT NULL DEFAULT now()
);

-- Labels in Parquet (driftloop.storage.label_files): one file per model and day of prediction time,
-- rewritten whole while labels of that day still arrive, so a training set over months is
-- one read. watermark: the newest labels.logged_at the file holds.
CREATE TABLE label_files (
    model_name text NOT NULL,
    day        date NOT NULL,
    object_key text NOT NULL,
    row_count  integer NOT NULL,
    watermark  timestamptz NOT NULL,
    written_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, day)
);
-- The newest label of a day, at the cost of one index probe (has the day's file fallen behind?).
CREATE INDEX labels_logged_at ON labels (logged_at);
