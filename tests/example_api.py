"""The README's "Use from Python" example, verbatim (tests/test_api.py keeps them equal, runs it
against the emulator, and mypy --strict checks it as a caller's script)."""

import asyncio

import bulkoffboard


async def main() -> int:
    stop = asyncio.Event()  # set it from another task to stop: calls in flight finish, exit 130
    summary = await bulkoffboard.run(
        ["1e5bc9d7e413ddd7902c2932e418702b84d0cc07", "2b8a1f3c9d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a"],
        journal="offboard-2026-12-04.jsonl",  # ids given as values are kept beside it
        comment="CHG0042 retire",
        stop=stop,
    )
    print(summary.exit_code, dict(summary.counts), summary.run_id)
    if summary.exit_code == bulkoffboard.ExitCode.SOME_FAILED:
        summary = await bulkoffboard.resume("offboard-2026-12-04.jsonl")
    verified = await bulkoffboard.verify("offboard-2026-12-04.jsonl")
    print(verified.statuses)
    print(bulkoffboard.report("offboard-2026-12-04.jsonl", format="table"))
    return int(summary.exit_code)


asyncio.run(main())
