-- Parquet feature partitions in the object store, tracked with their own Kafka offsets.

-- Next offset of each predictions partition whose records are all in committed Parquet files.
CREATE TABLE feature_offsets (
    topic       text NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);

-- A flush in progress: its objects are deleted by the next owner when it never completed.
CREATE TABLE feature_flushes (
    flush_id    text PRIMARY KEY,
    partitions  text[] NOT NULL,
    object_keys text[] NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now()
);

-- Manifest: every committed Parquet file and the Kafka offsets whose records it holds.
CREATE TABLE feature_files (
    object_key     text PRIMARY KEY,
    flush_id       text NOT NULL,
    model_name     text NOT NULL,
    partition_date date NOT NULL,
    partition_hour smallint NOT NULL,
    row_count      integer NOT NULL,
    offsets        jsonb NOT NULL,
    written_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feature_files_model_time ON feature_files (model_name, partition_date, partition_hour);
