"""Actions, one module per integration, found by name. Modules are imported on first use."""

from dr_orchestrator.actions.base import ActionRegistry

BUILTIN_ACTIONS = {
    "shell.run": "dr_orchestrator.actions.shell:ShellRun",
    "http.check": "dr_orchestrator.actions.http:HttpCheck",
    "tcp.check": "dr_orchestrator.actions.tcp:TcpCheck",
    "wait": "dr_orchestrator.actions.wait:Wait",
    "noop": "dr_orchestrator.actions.wait:Noop",
    "fail": "dr_orchestrator.actions.wait:Fail",
    "approval": "dr_orchestrator.actions.approval:ApprovalGate",
    "aws.route53.switch": "dr_orchestrator.actions.aws.route53:Route53Switch",
    "aws.route53.health": "dr_orchestrator.actions.aws.route53:Route53Health",
    "aws.rds.promote": "dr_orchestrator.actions.aws.rds:RdsPromote",
    "aws.ec2.start": "dr_orchestrator.actions.aws.ec2:Ec2Start",
    "aws.elbv2.shift": "dr_orchestrator.actions.aws.elbv2:Elbv2Shift",
    "aws.s3.archive": "dr_orchestrator.actions.aws.s3:S3Archive",
    "ssh.run": "dr_orchestrator.actions.ssh:SshRun",
    "notify.webhook": "dr_orchestrator.actions.notify:NotifyWebhook",
    "notify.email": "dr_orchestrator.actions.notify:NotifyEmail",
    "notify.apprise": "dr_orchestrator.actions.notify:NotifyApprise",
    "postgres.replication_status": "dr_orchestrator.actions.postgres.replication:ReplicationStatus",
    "postgres.set_read_only": "dr_orchestrator.actions.postgres.promotion:SetReadOnly",
    "postgres.promote": "dr_orchestrator.actions.postgres.promotion:Promote",
    "postgres.rpo": "dr_orchestrator.actions.postgres.rpo:Rpo",
    "postgres.wait_caught_up": "dr_orchestrator.actions.postgres.replication:WaitCaughtUp",
    "postgres.set_sync": "dr_orchestrator.actions.postgres.replication:SetSync",
    "postgres.rebuild_standby": "dr_orchestrator.actions.postgres.rebuild:RebuildStandby",
    "redis.replication_status": "dr_orchestrator.actions.redis:ReplicationStatus",
    "redis.promote": "dr_orchestrator.actions.redis:Promote",
    "redis.rpo": "dr_orchestrator.actions.redis:Rpo",
    "redis.replicate": "dr_orchestrator.actions.redis:Replicate",
    "haproxy.set_active": "dr_orchestrator.actions.haproxy:SetActive",
    "haproxy.state": "dr_orchestrator.actions.haproxy:State",
    "ansible.playbook": "dr_orchestrator.actions.ansible:AnsiblePlaybook",
}


def default_registry() -> ActionRegistry:
    return ActionRegistry(BUILTIN_ACTIONS)
