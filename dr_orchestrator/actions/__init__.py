"""Actions, one module per integration, found by name. Modules are imported on first use."""

from dr_orchestrator.actions.base import ActionRegistry

BUILTIN_ACTIONS = {
    "shell.run": "dr_orchestrator.actions.shell:ShellRun",
    "http.check": "dr_orchestrator.actions.http:HttpCheck",
    "tcp.check": "dr_orchestrator.actions.tcp:TcpCheck",
    "wait": "dr_orchestrator.actions.wait:Wait",
    "noop": "dr_orchestrator.actions.wait:Noop",
    "fail": "dr_orchestrator.actions.wait:Fail",
    "ssh.run": "dr_orchestrator.actions.ssh:SshRun",
}


def default_registry() -> ActionRegistry:
    return ActionRegistry(BUILTIN_ACTIONS)
