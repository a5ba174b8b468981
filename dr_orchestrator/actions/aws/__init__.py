"""``aws.*`` actions: cloud failover through boto3, one module per AWS service.

boto3 is imported by these modules only, and they are imported only when a runbook uses them.
"""
