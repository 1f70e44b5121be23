-- Shadow predictions (issue 15): versions that do not serve, scored off the request path on the
-- predictions stream by the shadow-scorer, each row with the role its version had then:
-- challenger (waiting for live evidence under the alias "challenger"), previous_champion (the
-- version the champion replaced, the counterfactual of a promotion and the judge of a
-- rollback), first_champion (the frozen first version, the loop's baseline).
-- Idempotency key: (request_id, model_version): a replayed Kafka batch inserts nothing.
-- Joined to prediction_log and labels on request_id to compare errors on the same rows; rows
-- older than the model's hot retention are deleted with them by the shadow-scorer.

CREATE TABLE shadow_predictions (
    request_id     text NOT NULL,
    model_version  integer NOT NULL,
    model_name     text NOT NULL,
    role           text NOT NULL
        CHECK (role IN ('challenger', 'previous_champion', 'first_champion')),
    served_version integer NOT NULL,
    predicted_at   timestamptz NOT NULL,
    prediction     double precision NOT NULL,
    scored_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (request_id, model_version)
);
-- The comparisons join on the primary key (request_id, then model_version); expiry goes by
-- model and time.
CREATE INDEX shadow_predictions_model_time ON shadow_predictions (model_name, predicted_at);
