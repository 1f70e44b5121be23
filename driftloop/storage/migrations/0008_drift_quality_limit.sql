-- A window's quality judged against its version's limit (issue 15): the version's promotion
-- metric at the window's labelled rows may not pass what its own holdout gives 1 time in 100
-- (driftloop.drift.baseline.QualityCalibration). A window past it drifted whatever its inputs
-- show. Both NULL/false for windows judged before, refused ones, and windows without enough
-- labels or a version without a labelled holdout.
ALTER TABLE drift_runs
    ADD COLUMN quality_limit double precision,
    ADD COLUMN quality_degraded boolean NOT NULL DEFAULT false;
