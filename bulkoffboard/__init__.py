"""bulkoffboard: offboard devices from Microsoft Defender for Endpoint in bulk.

Throttled under the API's sliding limits, journaled to JSONL so an interrupted run resumes
without offboarding a machine twice.

The public API (a contract, like the command line): :func:`run`, :func:`resume`,
:func:`verify` and :func:`cancel` (async), :func:`report`, :func:`report_history` and
:func:`export_journals` (over many journals), and :func:`check` (async); their
results (:class:`Summary`, :class:`VerifySummary`, :class:`CancelSummary`,
:class:`CheckResult`, :class:`ExitCode`); the
settings a caller may build (:class:`Connection`); the hooks it may pass
(:class:`RunObserver`); and the error tree rooted at :class:`BulkOffboardError`. See
:mod:`bulkoffboard.api`.
"""

__version__ = "0.1.0"

# After __version__: the modules below read it from here.
from bulkoffboard.api import (
    cancel,
    check,
    export_journals,
    report,
    report_history,
    resume,
    run,
    verify,
)
from bulkoffboard.cancel import CancelSummary
from bulkoffboard.config import Connection
from bulkoffboard.errors import (
    ApiError,
    AuthError,
    BulkOffboardError,
    JournalError,
    JournalLockedError,
    SourceError,
    UsageError,
)
from bulkoffboard.jobs import CheckResult, RunObserver
from bulkoffboard.runner import ExitCode, Summary
from bulkoffboard.verify import VerifySummary

__all__ = [
    "ApiError",
    "AuthError",
    "BulkOffboardError",
    "CancelSummary",
    "CheckResult",
    "Connection",
    "ExitCode",
    "JournalError",
    "JournalLockedError",
    "RunObserver",
    "SourceError",
    "Summary",
    "UsageError",
    "VerifySummary",
    "__version__",
    "cancel",
    "check",
    "export_journals",
    "report",
    "report_history",
    "resume",
    "run",
    "verify",
]
