"""Analysis tools over run directories: credit maps (credit.py, viz.py: `cepo-viz`), training curves
(plots.py) and seeded comparisons (compare.py: `cepo-compare`). They read what a run wrote; the training
loop reaches them only through `credit.CreditRecorder`."""
