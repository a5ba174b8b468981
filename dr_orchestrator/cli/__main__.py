"""`python -m dr_orchestrator.cli`: the `dr` command."""

from dr_orchestrator.cli import main

if __name__ == "__main__":
    main()
