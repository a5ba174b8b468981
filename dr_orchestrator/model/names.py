"""Names and labels as the evidence database keeps them: a longer one would be lost mid-run, so the
model refuses it when the file is read (loading names the file, line and field)."""

from typing import Annotated

from pydantic import Field

MAX_NAME = 200  # runbook, step, action, service, site, host, mark, inventory
MAX_LABEL = 50  # a service's tier and criticality

Name = Annotated[str, Field(max_length=MAX_NAME)]
Label = Annotated[str, Field(max_length=MAX_LABEL)]
