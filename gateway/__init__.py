"""The serving gateway: synchronous predictions with the champion model, every one published."""
