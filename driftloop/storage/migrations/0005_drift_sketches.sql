-- Drift at traffic rate (issue 13): the feature-logger sketches the rows it logs, in the same
-- transaction, and the drift monitor judges time windows from those sketches.

-- The sketch layout (bins cut from the reference) of each model version the monitor watches,
-- published by the monitor when it takes a version on; the feature-logger reads it to sketch.
CREATE TABLE drift_baselines (
    model_name    text NOT NULL,
    model_version integer NOT NULL,
    layout        jsonb NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, model_version)
);

-- One row per logged batch and slice of prediction time (driftloop.drift.slices.SLICE): the
-- sketch of the batch's rows first logged in that slice, written with them. A window is the
-- merge of its slices. Rows logged while their version had no published layout are counted in
-- unsketched_rows (sketch null), and the monitor rebuilds that window from the log.
CREATE TABLE drift_sketches (
    id              bigserial PRIMARY KEY,
    model_name      text NOT NULL,
    model_version   integer NOT NULL,
    slice_start     timestamptz NOT NULL,
    rows            integer NOT NULL CHECK (rows >= 0),
    unsketched_rows integer NOT NULL DEFAULT 0 CHECK (unsketched_rows >= 0),
    sketch          bytea,
    logged_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX drift_sketches_window ON drift_sketches (model_name, model_version, slice_start);

-- What a judged window leaves: its merged sketch (long windows merge these), when its verdict
-- came (monitor lag), and how many rows arrived after it was judged.
ALTER TABLE drift_runs
    ADD COLUMN sketch bytea,
    ADD COLUMN lag_seconds double precision,
    ADD COLUMN sample_rows integer NOT NULL DEFAULT 0,
    ADD COLUMN late_rows integer NOT NULL DEFAULT 0;
