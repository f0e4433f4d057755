// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The short seeded fuzz pass of tier 1: a fixed number of inputs per
//! target, seed 1; no panics, hangs or divergences. The long pass is
//! `vui-fuzz --seconds N --seed S` (README, "Fuzzing").

use vui_fuzz::{daemon, run, Budget, Options};

fn pass(target: &str, inputs: u64) {
    let opts = Options {
        daemon: None,
        verbose: false,
    };
    let report = run(target, 1, 0, Budget::Inputs(inputs), &opts);
    println!("{report}");
    assert_eq!(report.inputs, inputs);
    assert!(report.clean(), "{report}");
}

#[test]
fn request_bytes_over_the_device_model() {
    pass("request", 6000);
}

#[test]
fn descriptor_chains_against_the_reference() {
    pass("chain", 2500);
}

#[test]
fn ioas_operations_against_the_page_by_page_reference() {
    pass("ioas", 1500);
}

#[test]
fn guest_maps_never_reach_outside_guest_ram() {
    pass("ram-bound", 6000);
}

/// The daemon targets need the daemon binary, which `cargo test
/// --workspace` builds (the back-end's own tests run it).
fn daemon_built() -> bool {
    match daemon::locate(None) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: {e}");
            false
        }
    }
}

#[test]
fn vhost_user_messages_to_a_daemon() {
    if daemon_built() {
        pass("vhost-user", 120);
    }
}

#[test]
fn mirror_messages_from_a_hostile_qemu() {
    if daemon_built() {
        pass("mirror", 120);
    }
}

#[test]
fn control_socket_bytes_from_a_hostile_client() {
    if daemon_built() {
        pass("control", 120);
    }
}
