"""The evidence room: schema, the store (an engine observer), RTO/RPO computation, queries, migrations.

Modules are imported where used (``from dr_orchestrator.evidence.store import EvidenceStore``) so
that importing this package stays cheap for ``dr --help``.
"""
