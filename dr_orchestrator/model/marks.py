"""How a program tells a step when it acted (kept free of heavy imports: `dr lab` prints it)."""

# A program run by `shell.run` that knows the exact moment it acted (`dr lab kill-site`: when its SIGKILLs
# went out) prints a line with this prefix and that moment; the step's `marks` then carry it instead of
# the step's end.
MARKED_AT_PREFIX = "dr-marked-at: "
