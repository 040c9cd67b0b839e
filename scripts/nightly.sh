#!/usr/bin/env bash
# Nightly stale-device batch: offboard the machines inactive for N days into a new, dated
# journal, then verify the offboard actions of the last few journals.
#
#   nightly.sh [ENV_FILE]          (or BULKOFFBOARD_ENV_FILE; default /etc/bulkoffboard/env)
#
# The env file (mode 0600, owned by the service account) holds `export NAME=value` lines: the
# AZURE_* connection settings (README "Configure") and, optionally, these settings:
#
#   BULKOFFBOARD_BIN               the bulkoffboard executable   (default: bulkoffboard on PATH)
#   BULKOFFBOARD_JOURNAL_DIR       where dated journals go       (default /var/lib/bulkoffboard/journals)
#   BULKOFFBOARD_INACTIVE_DAYS     run --inactive-days           (default 30)
#   BULKOFFBOARD_COMMENT           run --comment                 (default: the tool's / config's)
#   BULKOFFBOARD_MAX_MACHINES      run --max-machines: a night that would offboard more refuses
#                                  to start (exit 2), e.g. after an inventory glitch (default
#                                  1000; empty for no cap)
#   BULKOFFBOARD_VERIFY_LAST       journals to verify, newest first, tonight's included (default 7)
#   BULKOFFBOARD_VERIFY_MAX_AGE    verify --max-age DAYS          (default 14)
#   BULKOFFBOARD_TENANTS           a tenants file (README "MSSP: many tenants"): every night
#                                  runs in each of its tenants, side by side (default: none,
#                                  one tenant from the AZURE_* settings)
#   BULKOFFBOARD_EXPORT_DB         after verify, export every journal of JOURNAL_DIR into this
#                                  database (README "Export to a database"): sqlite:///PATH or
#                                  postgresql://USER@HOST/DB, the password in
#                                  BULKOFFBOARD_DB_PASSWORD; passed in the environment, never
#                                  on a command line (default: none, no export)
#
# Each night gets JOURNAL_DIR/YYYY-MM-DD/offboard.jsonl, with run.summary.json and
# verify.summary.json (--summary-json) beside it; with BULKOFFBOARD_TENANTS, the night's folder
# is the run directory: one journal a tenant (JOURNAL_DIR/YYYY-MM-DD/<tenant>.jsonl). Run again
# the same day, it resumes the night instead (unless its run already ended with exit 0).
#
# Exit codes: 0 all good; 1 some machines failed or some verify found problems (the journals
# say which: `bulkoffboard report --journal ... --format html`); 2 configuration or a journal
# in use (another nightly still running); 3 authentication or permission; 130 stopped by a
# signal (the journal is consistent: the next run resumes it).
#
# Nothing here prints the environment: the secret stays in the env file and in the process
# environment of bulkoffboard, which never logs it.
set -euo pipefail
umask 077

log() {
    printf '%s nightly[%d] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$$" "$*" >&2
}

env_file=${1:-${BULKOFFBOARD_ENV_FILE:-/etc/bulkoffboard/env}}
if [[ ! -f $env_file || ! -r $env_file ]]; then
    log "error: cannot read the env file $env_file"
    exit 2
fi
mode=$(stat -c %a "$env_file" 2>/dev/null || stat -f %Lp "$env_file" 2>/dev/null || echo "")
if [[ -n $mode && $(( 8#$mode & 8#077 )) -ne 0 ]]; then
    log "warning: $env_file is mode $mode; it holds a secret: chmod 600 it"
fi
# shellcheck disable=SC1090  # the path is configuration
set +x  # never trace the secret
. "$env_file"

bin=${BULKOFFBOARD_BIN:-bulkoffboard}
journal_dir=${BULKOFFBOARD_JOURNAL_DIR:-/var/lib/bulkoffboard/journals}
inactive_days=${BULKOFFBOARD_INACTIVE_DAYS:-30}
verify_last=${BULKOFFBOARD_VERIFY_LAST:-7}
verify_max_age=${BULKOFFBOARD_VERIFY_MAX_AGE:-14}
max_machines=${BULKOFFBOARD_MAX_MACHINES-1000}
tenants=${BULKOFFBOARD_TENANTS:-}
export_db=${BULKOFFBOARD_EXPORT_DB:-}
today=${BULKOFFBOARD_DATE:-$(date +%F)}  # BULKOFFBOARD_DATE: for tests and catch-up runs

for number in "$inactive_days" "$verify_last" "$verify_max_age" ${max_machines:+"$max_machines"}; do
    if [[ ! $number =~ ^[0-9]+$ ]]; then
        log "error: expected a whole number of days or journals, not '$number'"
        exit 2
    fi
done
if [[ ! $today =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
    log "error: BULKOFFBOARD_DATE must be YYYY-MM-DD, not '$today'"
    exit 2
fi
if [[ -n $tenants && ! -r $tenants ]]; then
    log "error: cannot read the tenants file $tenants"
    exit 2
fi
if ! command -v "$bin" >/dev/null 2>&1; then
    log "error: $bin not found (set BULKOFFBOARD_BIN)"
    exit 2
fi
mkdir -p "$journal_dir"

# One nightly at a time: a slow night must not overlap the next one.
if command -v flock >/dev/null 2>&1; then
    exec 9>>"$journal_dir/.nightly.lock"
    if ! flock -n 9; then
        log "error: another nightly run holds $journal_dir/.nightly.lock"
        exit 2
    fi
fi

# A signal to this script is passed on once to the bulkoffboard running now, which stops taking
# machines, lets the calls in flight finish and exits 130. (systemd: KillMode=mixed, so only
# this script gets the SIGTERM and bulkoffboard gets exactly one.)
child=""
stopping=0
signalled=0
on_signal() {
    stopping=1
    signalled=1
    if [[ -n $child ]]; then
        kill -TERM "$child" 2>/dev/null || true
    fi
}
trap on_signal INT TERM

# Run a command in the background and wait for it, through signals; returns its exit code.
run_child() {
    "$@" &
    child=$!
    local rc=0
    while :; do
        signalled=0
        wait "$child" && rc=0 || rc=$?
        # A trapped signal cuts `wait` short (rc > 128), whether or not the child has exited
        # yet: wait again, which returns the child's own exit code once it has one.
        if ((rc > 128 && signalled)); then
            continue
        fi
        break
    done
    child=""
    return "$rc"
}

night_dir="$journal_dir/$today"
journal="$night_dir/offboard.jsonl"
mkdir -p "$night_dir"
# What a night's journals are called, and how a command names them.
if [[ -n $tenants ]]; then
    target=(--run-dir "$night_dir")
    started="$night_dir/tenants.toml"
else
    target=(--journal "$journal")
    started="$journal"
fi

run_rc=0
if [[ -s $started ]]; then
    # The whole run's exit code is the summary's top-level one (two spaces in).
    if [[ -f $night_dir/run.summary.json ]] && grep -q '^  "exit_code": *0,\?$' "$night_dir/run.summary.json"; then
        log "tonight's run already finished: ${target[*]}"
    else
        log "resuming ${target[*]}"
        run_child "$bin" resume "${target[@]}" --log-format json \
            --summary-json "$night_dir/run.summary.json" || run_rc=$?
    fi
else
    # No --yes: it would lift the --max-machines cap, the one guard against a night that
    # suddenly wants to offboard the whole fleet (in each tenant, with a tenants file).
    args=(run --inactive-days "$inactive_days" "${target[@]}" --log-format json
        --summary-json "$night_dir/run.summary.json")
    if [[ -n $tenants ]]; then
        args+=(--tenants "$tenants")
    fi
    if [[ -n $max_machines ]]; then
        args+=(--max-machines "$max_machines")
    fi
    if [[ -n ${BULKOFFBOARD_COMMENT:-} ]]; then
        args+=(--comment "$BULKOFFBOARD_COMMENT")
    fi
    log "offboarding machines inactive for $inactive_days days into ${target[*]}"
    run_child "$bin" "${args[@]}" || run_rc=$?
fi

case $run_rc in
0) log "run: done" ;;
1) log "run: some machines failed (tomorrow's run tries them again; resume now with: $bin resume ${target[*]})" ;;
130)
    log "run: stopped; the journal is consistent and the next run resumes it"
    exit 130
    ;;
2 | 3)
    log "run: exit $run_rc (configuration, a journal in use, more machines than" \
        "BULKOFFBOARD_MAX_MACHINES, or permission): not verifying"
    exit "$run_rc"
    ;;
*)
    log "run: unexpected exit $run_rc: not verifying"
    exit "$run_rc"
    ;;
esac
if ((stopping)); then
    exit 130
fi

# Verify the newest nights, tonight's first. Dated folder names sort by date. A night is its
# journal, or with a tenants file its run directory (the folder holding tenants.toml).
verify_rc=0
journals=()
marker=offboard.jsonl
[[ -n $tenants ]] && marker=tenants.toml
while IFS= read -r found; do
    journals+=("$found")
done < <(
    find "$journal_dir" -mindepth 2 -maxdepth 2 -name "$marker" -size +0 -print |
        sort -r | head -n "$verify_last"
)
for each in ${journals[@]+"${journals[@]}"}; do
    rc=0
    if [[ -n $tenants ]]; then
        night=(--run-dir "$(dirname "$each")")
    else
        night=(--journal "$each")
    fi
    log "verifying ${night[*]}"
    run_child "$bin" verify "${night[@]}" --max-age "$verify_max_age" --log-format json \
        --summary-json "$(dirname "$each")/verify.summary.json" || rc=$?
    case $rc in
    0) ;;
    130)
        log "verify: stopped"
        exit 130
        ;;
    3)
        log "verify: exit 3 (the app needs Machine.Read.All): not verifying the others"
        exit 3
        ;;
    *)
        log "verify: exit $rc for $each"
        verify_rc=1
        ;;
    esac
    if ((stopping)); then
        exit 130
    fi
done

# The history database: incremental, so a night whose export failed is caught up the next night.
export_rc=0
if [[ -n $export_db ]]; then
    log "exporting $journal_dir to the database of BULKOFFBOARD_EXPORT_DB"
    rc=0
    BULKOFFBOARD_DB=$export_db run_child "$bin" export --journal-dir "$journal_dir" \
        --log-format json --summary-json "$journal_dir/$today/export.summary.json" || rc=$?
    case $rc in
    0) ;;
    130)
        log "export: stopped"
        exit 130
        ;;
    *)
        log "export: exit $rc (the journals are intact; the next export catches up)"
        export_rc=1
        ;;
    esac
fi

if ((run_rc != 0 || verify_rc != 0 || export_rc != 0)); then
    exit 1
fi
log "all done"
