"""The drift monitor's core: judge windows, track drift episodes, render and store reports."""
