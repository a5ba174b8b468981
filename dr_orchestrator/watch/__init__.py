"""``dr watch``: observe every service and site, agree on what is down (suspect vs down), classify it,
apply the policy, and keep the incident's record. See docs/watch.md."""
