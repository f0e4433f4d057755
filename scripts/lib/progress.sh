#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Progress for a long step: a line every 30 s on stderr, so a cold start
# never sits silent for minutes.
#
# Usage (sourced):  . scripts/lib/progress.sh
#   progress_run LABEL DIR COMMAND [ARG...]
#       Runs COMMAND and returns its exit status; while it runs, every 30 s
#       prints "LABEL: N s, M objects built" (M counts the *.o files under
#       DIR): for compiles whose output says nothing.
#   progress_with LABEL PROBE COMMAND [ARG...]
#       The same, with "LABEL: N s, WHAT": WHAT is what the command PROBE
#       (a function or program, run without arguments) prints at that
#       moment, e.g. a build's step count or a download's size; nothing
#       after the seconds if it prints nothing (PROBE ":" for time alone).
#   progress_size PATH
#       A probe's answer: "X MiB so far" for what PATH (a file or directory)
#       holds now.
# VUI_PROGRESS_SECONDS changes the 30 s (the tests use 1).
# COMMAND may be a shell function: redirect its output where it is defined
# or called (progress_with ... my_step >log 2>&1 sends the progress lines
# to the log too: redirect inside the function instead).
set -eu

progress_with() {
    _pr_label=$1
    _pr_probe=$2
    shift 2
    "$@" &
    _pr_pid=$!
    _pr_every=${VUI_PROGRESS_SECONDS:-30}
    _pr_t0=$(date +%s)
    _pr_next=$((_pr_t0 + _pr_every))
    while kill -0 "$_pr_pid" 2>/dev/null; do
        sleep 1
        _pr_now=$(date +%s)
        if [ "$_pr_now" -ge "$_pr_next" ]; then
            _pr_what=$("$_pr_probe" 2>/dev/null || true)
            echo "$_pr_label: $((_pr_now - _pr_t0)) s${_pr_what:+, $_pr_what}" >&2
            _pr_next=$((_pr_next + _pr_every))
        fi
    done
    wait "$_pr_pid"
}

# progress_run's probe: the objects under its DIR.
_pr_objects() {
    echo "$(find "$_pr_dir" -name '*.o' 2>/dev/null | wc -l) objects built"
}

progress_run() {
    _pr_dir=$2
    _pr_run_label=$1
    shift 2
    progress_with "$_pr_run_label" _pr_objects "$@"
}

progress_size() {
    echo "$(du -sm "$1" 2>/dev/null | cut -f1) MiB so far"
}
