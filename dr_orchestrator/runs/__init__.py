"""Running plans: ``execute`` (the one composition of a run), ``resume`` (going on with an
interrupted run)."""
