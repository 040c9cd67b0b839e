"""Nightly operations: the wrapper script's exit-code handling (with a stand-in bulkoffboard),
and the systemd units and cron line it ships with."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "nightly.sh"
CONFIGS = ROOT / "configs"
SECRET = "nightly-secret-that-must-not-print"
TODAY = "2026-11-28"

#: Stands in for bulkoffboard: logs its arguments, makes the journal on ``run``, writes the
#: summary file, and exits as told (FAKE_RUN_RC, FAKE_VERIFY_RC, FAKE_VERIFY_FAIL for journals
#: whose path contains it, FAKE_SLEEP to run until a SIGTERM).
FAKE = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$*" >>"$FAKE_LOG"
[[ -n ${AZURE_CLIENT_SECRET:-} ]] && echo "secret-present" >>"$FAKE_LOG"
[[ -n ${BULKOFFBOARD_DB:-} ]] && echo "db-in-environment" >>"$FAKE_LOG"
command=$1
shift
journal="" summary="" run_dir=""
while (($#)); do
    case $1 in
    --journal) journal=$2; shift ;;
    --run-dir) run_dir=$2; journal=$2/tenants.toml; shift ;;
    --summary-json) summary=$2; shift ;;
    esac
    shift
done
rc=0
case $command in
run | resume)
    if [[ $command == run && -n $run_dir ]]; then
        printf '[[tenant]]\n' >"$journal"
    elif [[ $command == run ]]; then
        printf '{"type":"header"}\n' >"$journal"
    fi
    rc=${FAKE_RUN_RC:-0}
    if [[ -n ${FAKE_SLEEP:-} ]]; then
        sleep "$FAKE_SLEEP" &
        sleeper=$!
        trap 'kill "$sleeper"; echo TERM >>"$FAKE_LOG"; exit 130' TERM
        wait "$sleeper"
    fi
    ;;
verify)
    rc=${FAKE_VERIFY_RC:-0}
    if [[ -n ${FAKE_VERIFY_FAIL:-} && $journal == *"$FAKE_VERIFY_FAIL"* ]]; then rc=1; fi
    ;;
export)
    rc=${FAKE_EXPORT_RC:-0}
    ;;
esac
printf '{\n  "exit_code": %d,\n  "journal": "%s"\n}\n' "$rc" "$journal" >"$summary"
exit "$rc"
"""


class Night:
    """A sandbox for one nightly.sh: an env file, a journal folder, the fake binary."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.journals = tmp_path / "journals"
        self.log = tmp_path / "fake.log"
        self.fake = tmp_path / "bin" / "bulkoffboard"
        self.fake.parent.mkdir()
        self.fake.write_text(FAKE)
        self.fake.chmod(0o755)
        self.env_file = tmp_path / "env"
        self.env_file.write_text(
            f"export AZURE_TENANT_ID=tenant\nexport AZURE_CLIENT_ID=client\n"
            f"export AZURE_CLIENT_SECRET={SECRET}\n"
            f"export BULKOFFBOARD_BIN={self.fake}\n"
            f"export BULKOFFBOARD_JOURNAL_DIR={self.journals}\n"
            "export BULKOFFBOARD_VERIFY_LAST=3\n"
        )
        self.env_file.chmod(0o600)

    def environ(self, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.tmp),
            "BULKOFFBOARD_ENV_FILE": str(self.env_file),
            "BULKOFFBOARD_DATE": TODAY,
            "FAKE_LOG": str(self.log),
            **extra,
        }

    def run(self, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(SCRIPT)],
            env=self.environ(**extra),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def calls(self) -> list[str]:
        if not self.log.exists():
            return []
        hidden = ("secret-present", "db-in-environment")
        return [line for line in self.log.read_text().splitlines() if line not in hidden]

    def old_journal(self, day: str) -> Path:
        path = self.journals / day / "offboard.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text('{"type":"header"}\n')
        return path


@pytest.fixture
def night(tmp_path: Path) -> Night:
    return Night(tmp_path)


def verified(night: Night) -> list[str]:
    found = []
    for call in night.calls():
        if call.startswith("verify "):
            match = re.search(r"--journal (\S+)", call)
            if match is not None:
                found.append(Path(match.group(1)).parent.name)
                continue
            match = re.search(r"--run-dir (\S+)", call)
            assert match is not None
            found.append(Path(match.group(1)).name)
    return found


# -- the script ----------------------------------------------------------------------------------


def test_the_script_parses_and_is_executable() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "set -x" not in text.replace("set +x", "")


def test_a_good_night_runs_into_a_dated_journal_then_verifies_the_last_journals(
    night: Night,
) -> None:
    for day in ("2026-11-20", "2026-11-25", "2026-11-26", "2026-11-27"):
        night.old_journal(day)

    done = night.run()

    assert done.returncode == 0, done.stderr
    journal = night.journals / TODAY / "offboard.jsonl"
    run_call = night.calls()[0]
    assert run_call == (
        f"run --inactive-days 30 --journal {journal} --log-format json "
        f"--summary-json {journal.parent / 'run.summary.json'} --max-machines 1000"
    )
    assert verified(night) == [TODAY, "2026-11-27", "2026-11-26"]  # the newest 3, tonight's first
    verify_call = night.calls()[1]
    assert "--max-age 14" in verify_call
    assert f"--summary-json {journal.parent / 'verify.summary.json'}" in verify_call
    assert (journal.parent / "verify.summary.json").exists()
    assert "secret-present" in night.log.read_text(), "the env file must reach bulkoffboard"
    assert SECRET not in done.stdout + done.stderr
    assert stat_mode(journal.parent) & 0o077 == 0, "umask 077: journals are private"


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_comment_and_the_machine_cap_come_from_the_env_file(night: Night) -> None:
    night.env_file.write_text(
        night.env_file.read_text()
        + "export BULKOFFBOARD_COMMENT='Stale devices, CHG0042'\n"
        + "export BULKOFFBOARD_MAX_MACHINES=\n"
        + "export BULKOFFBOARD_INACTIVE_DAYS=45\n"
    )
    assert night.run().returncode == 0
    run_call = night.calls()[0]
    assert "--inactive-days 45" in run_call
    assert run_call.endswith("--comment Stale devices, CHG0042")
    assert "--max-machines" not in run_call and "--yes" not in run_call


def test_some_failed_still_verifies_and_exits_1(night: Night) -> None:
    done = night.run(FAKE_RUN_RC="1")
    assert done.returncode == 1
    assert verified(night) == [TODAY]
    assert "resume now with" in done.stderr


@pytest.mark.parametrize("code", [2, 3, 130, 7])
def test_a_stopped_or_broken_run_is_not_followed_by_verify(night: Night, code: int) -> None:
    night.old_journal("2026-11-27")
    done = night.run(FAKE_RUN_RC=str(code))
    assert done.returncode == code
    assert verified(night) == []


def test_a_verify_that_finds_problems_makes_exit_1_but_the_others_still_run(
    night: Night,
) -> None:
    night.old_journal("2026-11-26")
    night.old_journal("2026-11-27")
    done = night.run(FAKE_VERIFY_FAIL="2026-11-27")
    assert done.returncode == 1
    assert verified(night) == [TODAY, "2026-11-27", "2026-11-26"]


def test_verify_without_read_permission_stops_with_exit_3(night: Night) -> None:
    night.old_journal("2026-11-27")
    done = night.run(FAKE_VERIFY_RC="3")
    assert done.returncode == 3
    assert verified(night) == [TODAY]


@pytest.mark.parametrize(("export_rc", "expected"), [(0, 0), (2, 1), (130, 130)])
def test_with_an_export_db_every_night_ends_with_an_export_of_the_journals(
    night: Night, export_rc: int, expected: int
) -> None:
    url = "postgresql://bb@db.example.com/soc"
    with night.env_file.open("a") as env:
        env.write(f"export BULKOFFBOARD_EXPORT_DB={url}\n")

    done = night.run(FAKE_EXPORT_RC=str(export_rc))

    assert done.returncode == expected, done.stderr
    last = night.calls()[-1]
    assert last == (
        f"export --journal-dir {night.journals} --log-format json "
        f"--summary-json {night.journals / TODAY / 'export.summary.json'}"
    )
    assert url not in last and url not in done.stderr, "the URL travels in the environment"
    assert "db-in-environment" in night.log.read_text()
    assert [c.split()[0] for c in night.calls()][:2] == ["run", "verify"]


def test_without_an_export_db_nothing_is_exported(night: Night) -> None:
    assert night.run().returncode == 0
    assert not any(call.startswith("export") for call in night.calls())


def test_a_second_start_the_same_day_resumes_or_skips_the_run(night: Night) -> None:
    assert night.run(FAKE_RUN_RC="1").returncode == 1
    again = night.run()  # the first run ended with exit 1: resume it
    assert again.returncode == 0, again.stderr
    assert [c.split()[0] for c in night.calls()] == ["run", "verify", "resume", "verify"]
    third = night.run()  # the resumed run ended with exit 0: nothing to run
    assert third.returncode == 0
    assert [c.split()[0] for c in night.calls()][4:] == ["verify"]
    assert "already finished" in third.stderr


def test_with_a_tenants_file_each_night_is_a_run_directory_of_every_tenant(
    night: Night,
) -> None:
    tenants = night.tmp / "tenants.toml"
    tenants.write_text('[[tenant]]\nname = "contoso"\ntenant_id = "t"\n')
    night.env_file.write_text(
        night.env_file.read_text() + f"export BULKOFFBOARD_TENANTS={tenants}\n"
    )
    old = night.journals / "2026-11-27"
    old.mkdir(parents=True)
    (old / "tenants.toml").write_text("[[tenant]]\n")
    night.old_journal("2026-11-26")  # a single-tenant night: not a run directory

    done = night.run(FAKE_RUN_RC="1")

    assert done.returncode == 1, done.stderr
    run_dir = night.journals / TODAY
    assert night.calls()[0] == (
        f"run --inactive-days 30 --run-dir {run_dir} --log-format json --summary-json "
        f"{run_dir / 'run.summary.json'} --tenants {tenants} --max-machines 1000"
    )
    assert verified(night) == [TODAY, "2026-11-27"]
    assert f"resume now with: {night.fake} resume --run-dir {run_dir}" in done.stderr
    again = night.run()
    assert again.returncode == 0, again.stderr
    assert night.calls()[3].startswith(f"resume --run-dir {run_dir} ")


def test_a_night_is_finished_only_when_its_whole_run_exited_0(night: Night) -> None:
    """A tenants summary holds each tenant's exit code too: only the top-level one counts."""
    assert night.run(FAKE_RUN_RC="1").returncode == 1
    summary = night.journals / TODAY / "run.summary.json"
    summary.write_text(
        '{\n  "exit_code": 1,\n  "tenants": {\n    "a": {\n      "exit_code": 0,\n'
        '      "reason": "completed"\n    }\n  }\n}\n'
    )
    again = night.run()
    assert [c.split()[0] for c in night.calls()][2] == "resume", again.stderr


def test_an_unreadable_tenants_file_exits_2_before_anything_runs(night: Night) -> None:
    night.env_file.write_text(
        night.env_file.read_text() + f"export BULKOFFBOARD_TENANTS={night.tmp / 'none.toml'}\n"
    )
    done = night.run()
    assert done.returncode == 2 and "cannot read the tenants file" in done.stderr
    assert night.calls() == []


def test_settings_and_the_env_file_are_checked_before_anything_runs(night: Night) -> None:
    missing = night.run(BULKOFFBOARD_ENV_FILE=str(night.tmp / "nope"))
    assert missing.returncode == 2 and "cannot read the env file" in missing.stderr
    bad_date = night.run(BULKOFFBOARD_DATE="28/11/2026")
    assert bad_date.returncode == 2
    night.env_file.write_text(night.env_file.read_text() + "export BULKOFFBOARD_VERIFY_LAST=x\n")
    assert night.run().returncode == 2
    assert night.calls() == []


def test_a_readable_env_file_is_warned_about_without_printing_it(night: Night) -> None:
    night.env_file.chmod(0o644)
    done = night.run()
    assert done.returncode == 0
    assert "chmod 600" in done.stderr
    assert SECRET not in done.stdout + done.stderr


def test_a_second_nightly_at_the_same_time_exits_2(night: Night) -> None:
    if shutil.which("flock") is None:
        pytest.skip("no flock(1) here")
    night.journals.mkdir()
    with (night.journals / ".nightly.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = night.run()
    assert done.returncode == 2
    assert "another nightly run" in done.stderr
    assert night.calls() == []


def test_sigterm_reaches_bulkoffboard_once_and_the_script_exits_130(night: Night) -> None:
    process = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=night.environ(FAKE_SLEEP="30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not night.calls() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # let the fake set its trap
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert night.calls().count("TERM") == 1
    assert verified(night) == []


# -- the units and the cron line -----------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}:{number}: not a key=value line"
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"{path.name}:{number}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_service_runs_the_script_once_with_a_gentle_stop() -> None:
    unit = parse_unit(CONFIGS / "bulkoffboard-nightly.service")
    assert set(unit) == {"Unit", "Service"}
    service = unit["Service"]
    assert service["Type"] == ["oneshot"]
    assert service["ExecStart"][0].endswith("/scripts/nightly.sh")
    assert service["KillMode"] == ["mixed"], "one SIGTERM for bulkoffboard, from the script"
    assert "BULKOFFBOARD_ENV_FILE=/etc/bulkoffboard/env" in service["Environment"]
    assert "EnvironmentFile" not in service, "the secret must not enter the unit's environment"
    assert service["UMask"] == ["0077"]


def test_the_timer_starts_the_service_nightly() -> None:
    unit = parse_unit(CONFIGS / "bulkoffboard-nightly.timer")
    assert unit["Timer"]["OnCalendar"] == ["*-*-* 02:30:00"]
    assert unit["Timer"]["Unit"] == ["bulkoffboard-nightly.service"]
    assert unit["Timer"]["Persistent"] == ["true"]
    assert unit["Install"]["WantedBy"] == ["timers.target"]


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here (the key checks above still ran)")
    names = ("bulkoffboard-nightly.service", "bulkoffboard-nightly.timer")
    for name in names:
        text = (CONFIGS / name).read_text()
        # The installed path does not exist here: point ExecStart at this checkout's script.
        text = re.sub(r"(?m)^ExecStart=.*$", f"ExecStart={SCRIPT}", text)
        (tmp_path / name).write_text(text)
    done = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ours = [line for line in done.stderr.splitlines() if "bulkoffboard-nightly" in line]
    assert done.returncode == 0, done.stderr
    assert ours == [], "systemd warns about our units: " + "\n".join(ours)


def test_the_cron_line_runs_the_script_nightly_as_the_service_account() -> None:
    entries = []
    for line in (CONFIGS / "bulkoffboard.cron").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", line):
            continue  # an environment line
        entries.append(line.split(None, 6))
    assert len(entries) == 1
    minute, hour, day, month, weekday, user, command = entries[0]
    assert (minute, hour, day, month, weekday) == ("30", "2", "*", "*", "*")
    assert user == "svc-mde"
    assert command.split()[0].endswith("/scripts/nightly.sh")
    assert "%" not in command, "cron turns % into a newline"
