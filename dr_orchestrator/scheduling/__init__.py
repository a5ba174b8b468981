"""The drill scheduler: APScheduler wiring, DST-safe cron triggers, the leader lock, the daemon."""
