"""bulkoffboard: offboard devices from Microsoft Defender for Endpoint in bulk.

Throttled under the API's sliding limits, journaled to JSONL so an interrupted run resumes
without offboarding a machine twice.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
