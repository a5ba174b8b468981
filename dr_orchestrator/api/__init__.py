"""The HTTP API and dashboard (`dr serve`). Only ``app`` and what it imports bring in FastAPI;
``tokens`` is plain SQLAlchemy, so `dr tokens` stays fast."""
