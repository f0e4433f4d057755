#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Progress for a long build step: a line every 30 s on stderr, so a cold
# start never sits silent for minutes.
#
# Usage (sourced):  . scripts/lib/progress.sh
#                   progress_run LABEL DIR COMMAND [ARG...]
# Runs COMMAND and returns its exit status; while it runs, every 30 s prints
# "LABEL: N s, M objects built" (M counts the *.o files under DIR).
set -eu

progress_run() {
    _pr_label=$1
    _pr_dir=$2
    shift 2
    "$@" &
    _pr_pid=$!
    _pr_t0=$(date +%s)
    _pr_next=$((_pr_t0 + 30))
    while kill -0 "$_pr_pid" 2>/dev/null; do
        sleep 1
        _pr_now=$(date +%s)
        if [ "$_pr_now" -ge "$_pr_next" ]; then
            _pr_n=$(find "$_pr_dir" -name '*.o' 2>/dev/null | wc -l)
            echo "$_pr_label: $((_pr_now - _pr_t0)) s, $_pr_n objects built" >&2
            _pr_next=$((_pr_next + 30))
        fi
    done
    wait "$_pr_pid"
}
