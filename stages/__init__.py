"""Pipeline stages: one thin click command per stage (``python -m stages.<name>``).

A stage reads its inputs, validates its options, calls :mod:`mom`, writes its
outputs atomically and logs. No algorithm lives here; no stage imports another.
"""
