"""Training, the first model, and retraining a drifted model against its champion."""
